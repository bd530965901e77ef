"""`python -m search.bench workers`: study throughput with 1 and 2 workers, and one worker's memory over a long study.

    python -m search.bench workers --data-dir /path/to/cifar        # the folder holding cifar-10-batches-py/

Throughput: the same small study (tiny CNNs on a CIFAR-10 subset, 1 epoch) run by N worker processes of
`search/local_workers.sh` sharing the journal file; trials per hour counted over the wall clock (start-up
included) and inside the study (first trial start to last trial end). Memory: one worker runs many short
trials; its resident set size (psutil) is sampled from outside when its first trial ends and when its last
one ends.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[2]

SPACE = """
name: bench
model: scratch_cnn
dataset: cifar10
budget: {trials: 8, epochs: 1, patience: 1, subset: 200}
params:
  image_size: 32
  conv_blocks: {type: int, low: 1, high: 2, default: 2}
  filters: {type: categorical, choices: [8, 16], default: 16}
  kernel_size: 3
  strides: 1
  pooling: max
  batch_norm: {type: categorical, choices: [true, false], default: true}
  dense_layers: 1
  dense_units: 32
  dropout: {type: float, low: 0.0, high: 0.5, default: 0.2}
  optimizer: adam
  learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true, default: 3.0e-3}
  loss: categorical_crossentropy
  batch_size: 64
  augmentation: none
recipes:
  none: []
"""


def worker_env() -> dict:
    """Workers import this checkout and keep TensorFlow quiet."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2",
            "NO_ALBUMENTATIONS_UPDATE": "1"}


def study_args(space: Path, data_dir: str, trials: int, subset: int) -> list[str]:
    """The search.run arguments every benchmark worker gets."""
    return ["--space", str(space), "--data-dir", data_dir, "--trials", str(trials), "--epochs", "1",
            "--subset", str(subset), "--sampler", "random", "--pruner", "none", "--quiet"]


def throughput(workers: int, folder: Path, space: Path, data_dir: str, trials: int, subset: int) -> dict:
    """Run one study with N local workers; trials per hour over the wall clock and inside the study."""
    import optuna

    started = time.perf_counter()
    done = subprocess.run([str(ROOT / "search" / "local_workers.sh"), str(workers),
                           *study_args(space, data_dir, trials, subset)],
                          cwd=folder, env=worker_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{workers} workers failed:\n{done.stdout}\n{done.stderr}")
    from search.stores import find_study

    counted = find_study("bench-cifar10", workdir=str(folder / "mlruns")).get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    inside = (max(t.datetime_complete for t in counted) - min(t.datetime_start for t in counted)).total_seconds()
    return {"workers": workers, "trials": len(counted), "wall_s": round(wall, 1),
            "trials_per_hour_wall": round(len(counted) / wall * 3600),
            "trials_per_hour_in_study": round(len(counted) / inside * 3600)}


def counted_in(store: str) -> int:
    """Complete or pruned trials of the benchmark study in a store, 0 before a worker created it."""
    import optuna

    try:
        study = optuna.load_study(study_name="bench-cifar10", storage=store)
    except Exception:  # no database or no study yet
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))


def memory_growth(folder: Path, space: Path, data_dir: str, trials: int, subset: int) -> dict:
    """One worker runs `trials` short trials; its RSS when the first and the last trial ended."""
    store = f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"
    worker = subprocess.Popen([sys.executable, "-m", "search.run", *study_args(space, data_dir, trials, subset)],
                              cwd=folder, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process, samples, peak = psutil.Process(worker.pid), {}, 0
    marks = sorted({1, 10, trials // 2, trials})  # growth that levels off is a cache; steady growth a leak
    while worker.poll() is None and len(samples) < len(marks):
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:  # it ended between the two checks
            break
        peak = max(peak, rss)
        finished = counted_in(store)
        for mark in marks:
            if finished >= mark and mark not in samples:
                samples[mark] = rss
        time.sleep(0.5)
    worker.wait()
    mb = 1024 * 1024
    row = {"trials": trials, **{f"rss_after_{m}_mb": round(samples.get(m, 0) / mb) for m in marks}}
    return {**row, "growth_mb": round((samples.get(trials, 0) - samples.get(1, 0)) / mb), "peak_mb": round(peak / mb)}


def main(argv: list[str] | None = None) -> int:
    """Print the throughput table (1 and 2 workers) and the memory table."""
    p = argparse.ArgumentParser(prog="python -m search.bench workers", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--trials", type=int, default=8, help="trials per throughput study")
    p.add_argument("--memory-trials", type=int, default=50, help="trials of the memory run")
    p.add_argument("--subset", type=int, default=200, help="images per split")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        space = Path(tmp) / "bench.yaml"
        space.write_text(SPACE)
        rows = []
        for n in (int(w) for w in args.workers.split(",") if w):  # --workers "" measures memory only
            (Path(tmp) / f"w{n}").mkdir()
            rows.append(throughput(n, Path(tmp) / f"w{n}", space, args.data_dir, args.trials, args.subset))
        if rows:
            print(pd.DataFrame(rows).to_markdown(index=False))
        (Path(tmp) / "memory").mkdir()
        memory = memory_growth(Path(tmp) / "memory", space, args.data_dir, args.memory_trials, args.subset)
        print()
        print(pd.DataFrame([memory]).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
