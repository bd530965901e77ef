#!/usr/bin/env bash
# N search workers on this machine, sharing one study:
#
#   search/local_workers.sh 4 --space scratch_cnn --trials 40
#
# Every argument after N goes to `python -m search.run`, plus `--workers N`: without --storage the
# workers then share the journal file mlruns/optuna.journal (SQLite is not safe for several writers).
# With GPUs (`nvidia-smi -L` lists them) worker i sees only card i mod <cards> via CUDA_VISIBLE_DEVICES.
# Each worker's output goes to <workdir>/workers/worker-<i>.log (default workdir mlruns/). Ctrl-C stops
# them all; the exit code is the first non-zero one of the workers.
set -u

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [python -m search.run options]   (N = number of worker processes)" >&2
  exit 2
fi
workers=$1
shift

workdir=mlruns  # where the logs go: the --workdir given to search.run, if any
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --workdir) workdir=${args[i + 1]:-mlruns} ;;
    --workdir=*) workdir=${args[i]#--workdir=} ;;
  esac
done
mkdir -p "$workdir/workers"

python=${PYTHON:-python}

# open both stores once before the workers start: processes creating one fresh MLflow or Optuna
# database at the same moment race on its tables, and all but one fail
stores_log="$workdir/workers/stores.log"
"$python" - "$@" --workers "$workers" >"$stores_log" 2>&1 <<'EOF' || { tail -n 5 "$stores_log" >&2; exit 2; }
import sys
from search.stores import open_storage, optuna_storage_url, tracking_uri
from search.errors import ConfigError
from search.run import config_from_args, parser
from search.tracking import connect

config = config_from_args(parser().parse_args(sys.argv[1:]))
try:
    open_storage(optuna_storage_url(config))
    connect(tracking_uri(config.tracking_uri, config.workdir))
except ConfigError as err:
    sys.exit(f"error: {err}")
EOF
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi

# job control: background workers keep Ctrl-C (a script's background jobs would ignore it); the trap
# passes it on so each worker marks its running trial KILLED and closes its runs
set -m
pids=()
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT TERM
for ((i = 0; i < workers; i++)); do
  log="$workdir/workers/worker-$i.log"
  if ((gpus > 0)); then
    CUDA_VISIBLE_DEVICES=$((i % gpus)) "$python" -m search.run "$@" --workers "$workers" >"$log" 2>&1 &
  else
    "$python" -m search.run "$@" --workers "$workers" >"$log" 2>&1 &
  fi
  pids+=($!)
  echo "worker $i: pid $! (GPU: $( ((gpus > 0)) && echo $((i % gpus)) || echo none)), log $log"
done

status=0
for pid in "${pids[@]}"; do
  while :; do  # a trapped signal interrupts `wait`: wait again until the worker has really ended
    wait "$pid"
    code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  ((status == 0)) && status=$code
done
exit "$status"
