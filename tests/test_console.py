"""What a user sees and touches: numbers checked at the edge, quick answers about unreachable stores, a clean
console, Ctrl-C without a traceback, MLflow experiments that open as model training with system metrics, and
the disk a study keeps (search.results --disk, --prune)."""
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from conftest import ROOT, TINY_SPACE, write_space


def run(*args, cwd, timeout=240, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def studies_in(db) -> list[str]:
    """The study names an Optuna SQLite file holds (none when the file does not exist)."""
    if not db.exists():
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{db}", include_best_trial=False)]


# ---------------------------------------------------------------- numbers checked right after parsing

BAD_NUMBERS = [
    (["--trials", "-1"], "--trials -1: give a whole number of at least 1"),
    (["--trials", "0"], "--trials 0: give a whole number of at least 1"),
    (["--timeout", "-5"], "--timeout -5: give a number of at least 0"),
    (["--timeout", "inf"], "--timeout inf: give a number of at least 0"),
    (["--epochs", "0"], "--epochs 0: give a whole number of at least 1"),
    (["--subset", "-5"], "--subset -5: give a whole number of at least 0"),
    (["--image-size", "0"], "--image-size 0: give a whole number of at least 8"),
    (["--image-size", "7"], "--image-size 7: give a whole number of at least 8 (pixels"),
    (["--max-failures", "0"], "--max-failures 0: give a whole number of at least 1"),
    (["--keep-models", "0"], "--keep-models 0: give a whole number of at least 1"),
    (["--workers", "0"], "--workers 0: give a whole number of at least 1"),
    (["--seed", "-1"], "--seed -1: give a whole number of at least 0"),
    (["--max-params", "0"], "--max-params 0: give a whole number of at least 1"),
    (["--max-inference-ms", "0"], "--max-inference-ms 0: give a number above 0"),
    (["--max-inference-ms", "nan"], "--max-inference-ms nan: give a number above 0"),
    (["--max-memory-growth", "-1"], "--max-memory-growth -1: give a number above 0"),
    (["--study-patience", "0"], "--study-patience 0: give a whole number of at least 1"),
    (["--within", "0"], "--within 0: give a number above 0"),
    (["--min-improvement", "-0.01"], "--min-improvement -0.01: give a number of at least 0"),
    (["--warm-start", "other:0"], "--warm-start other:0: give STUDY or STUDY:K"),
    (["--warm-start", "other:two"], "--warm-start other:two: give STUDY or STUDY:K"),
]


@pytest.mark.parametrize("args,message", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_an_out_of_range_number_exits_2_with_one_line_naming_the_flag(args, message, tmp_path, monkeypatch, capsys):
    from search.run import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no mlruns/, nothing else either


def test_every_problem_is_named_on_the_same_line(tmp_path, monkeypatch, capsys):
    from search.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["--trials", "-1", "--epochs", "0", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "--trials -1" in err and "--epochs 0" in err and "--seed" not in err and err.count("\n") == 1


def test_good_numbers_pass_the_check():
    from search.run import parser, range_problems

    args = parser().parse_args(["--trials", "1", "--timeout", "0", "--subset", "0", "--image-size", "8",
                                "--seed", "0", "--min-improvement", "0", "--within", "0.5", "--warm-start", "a:3"])
    assert range_problems(vars(args)) == []


def test_the_command_line_exits_2_without_traceback_and_writes_nothing(tmp_path):
    for args in (["--trials", "-1"], ["--image-size", "0"], ["--subset", "-5"], ["--trials", "many"]):
        done = run("search.run", *args, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists()


# ---------------------------------------------------------------- stores that do not answer


def test_an_unreachable_tracking_server_exits_2_quickly_and_no_study_is_created(tmp_path, cifar_dir):
    space = write_space(tmp_path, TINY_SPACE)
    started = time.monotonic()
    done = run("search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "1",
               "--tracking-uri", "http://127.0.0.1:1", cwd=tmp_path, timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "http://127.0.0.1:1" in done.stderr and "cannot be reached" in done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stdout + done.stderr
    assert seconds < 15, f"took {seconds:.0f} s"
    assert studies_in(tmp_path / "mlruns" / "optuna.db") == []


def test_a_server_that_never_answers_is_given_up_within_ten_seconds():
    from search.errors import ConfigError
    from search.tracking import connect

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers a request
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="cannot be reached.*timed out"):
            connect(uri)
        assert time.monotonic() - started < 11
        assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the quick settings were for the check only
    finally:
        silent.close()


def test_a_warm_start_from_an_unknown_study_leaves_no_study_behind(tmp_path, cifar_dir):
    space = write_space(tmp_path, TINY_SPACE)
    done = run("search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "1",
               "--warm-start", "nosuchstudy", cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "no study named 'nosuchstudy'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert studies_in(tmp_path / "mlruns" / "optuna.db") == []  # neither the study it would have warmed
    db = tmp_path / "mlruns" / "mlflow.db"
    assert not db.exists() or MlflowClient(f"sqlite:///{db}").get_experiment_by_name("tiny-cifar10") is None


# ---------------------------------------------------------------- Ctrl-C anywhere: 130 and no traceback


def test_ctrl_c_before_the_search_or_while_printing_the_table_exits_130(tmp_path, monkeypatch, capsys):
    import search.drivers
    import search.results
    from search.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")  # main sets it when unset: this test's process keeps none
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # nor main's TensorFlow import hook

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for target, name in ((search.drivers, "run_search"), (search.results, "leaderboard")):
        with monkeypatch.context() as patch:
            if name == "leaderboard":  # the search itself ends well; Ctrl-C lands in the table
                patch.setattr(search.drivers, "run_search", lambda config: type("S", (), {
                    "stopped": "target", "study_name": "s", "budget_started": None})())
            patch.setattr(target, name, interrupted)
            try:
                code = main(["--space", "scratch_cnn"])
            except KeyboardInterrupt:
                pytest.fail(f"Ctrl-C in {name} escaped main()")
        assert code == 130
        assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("delay", [0.5, 1.5, 4.0])
def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path, cifar_dir, delay):
    space = write_space(tmp_path, TINY_SPACE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "search.run", "--space", str(space), "--data-dir", str(cifar_dir),
                             "--trials", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)  # importing Optuna, TensorFlow, MLflow, or loading the data
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


# ---------------------------------------------------------------- a short real run: its console and records

CONSOLE_SPACE = TINY_SPACE.replace(
    "conv_blocks: {type: int, low: 1, high: 2, default: 2}", "conv_blocks: {type: int, low: 1, high: 4, default: 2}"
).replace("  strides: 1\n", "  strides: {type: categorical, choices: [1, 2], default: 1}\n") + """
baselines:
  cifar10:
    - name: pooling           # two trained trials that differ in one parameter only
      params: {}
      grid: {pooling: [max, average]}
    - name: too_deep          # 4 blocks of stride 2 and pooling shrink 32 px below 1 px: a pruned trial
      params: {conv_blocks: 4, strides: 2}
"""


@pytest.fixture(scope="module")
def console_run(cifar_dir, tmp_path_factory):
    """`python -m search.run` as a user types it: 2 trained trials and a rejected one (~15 s). Its report draws
    Optuna's contour plot of a parameter the trained trials share (which warns), and it registers a model
    (which downloads artifacts)."""
    folder = tmp_path_factory.mktemp("console")
    space = write_space(folder, CONSOLE_SPACE)
    done = run("search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "3", "--epochs", "1",
               "--subset", "200", "--timeout", "0", "--baselines", "--no-default-trial", "--report", cwd=folder,
               env={"KERAS_HOME": str(folder / "keras_home")})
    return folder, done


def test_the_console_of_a_short_run_holds_only_what_the_search_says(console_run):
    _, done = console_run
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    for noise in ("Downloading artifacts", "[W ", "Traceback", "absl::InitializeLog", "oneDNN custom operations",
                  "Creating initial MLflow database tables"):
        assert noise not in console, f"{noise!r} in:\n{console}"
    assert "rejected before training" in done.stdout and "best model: models:/tiny-cifar10-best/1" in done.stdout


def test_the_experiment_opens_as_model_training(console_run):
    folder, _ = console_run
    client = MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    assert client.get_experiment_by_name("tiny-cifar10").tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_older_experiment_without_the_kind_gets_it_and_a_chosen_kind_stays(tmp_path):
    from search.tracking import connect, experiment_id

    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    old = client.create_experiment("old-study")
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert experiment_id(client, "old-study", str(tmp_path / "artifacts")) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    experiment_id(client, "genai", None)
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_system_metrics_are_recorded_on_a_run_and_stop_with_it(tmp_path):
    from search.tracking import connect, start_system_metrics, stop_system_metrics

    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("metrics")).info.run_id
    monitor = start_system_metrics(run_id, client.tracking_uri, interval=0.3)
    assert monitor is not None
    time.sleep(1.0)
    stop_system_metrics(monitor)
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    logged = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    time.sleep(0.7)
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == logged  # stopped
    stop_system_metrics(None)  # a monitor that could not start: nothing to stop


# ---------------------------------------------------------------- disk: the footprint, and pruning


def test_disk_shows_each_studys_footprint_and_prune_keeps_only_the_best_model(console_run, monkeypatch, capsys):
    from search.disk import disk_usage
    from search.results import main as results_main

    folder, done = console_run
    assert done.returncode == 0, done.stderr
    monkeypatch.chdir(folder)
    workdir = folder / "mlruns"
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    best = study.best_trial.number
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    # a pruned or failed trial may have left files before it ended: give this one some
    client.log_text(pruned.user_attrs["mlflow_run_id"], "x" * 200_000, "partial/notes.txt")

    assert results_main(["--disk"]) == 0
    shown = capsys.readouterr().out
    assert "| tiny-cifar10 |" in shown and "kept_models" in shown and "image cache" in shown
    table, _ = disk_usage(None, workdir=str(workdir))
    row = table.set_index("study").loc["tiny-cifar10"]
    ensemble = (workdir / "models" / "tiny-cifar10" / "ensemble.keras").is_file()  # registered when it beat the best
    assert row["kept_models"] == 2 + ensemble and row["models_mb"] > 0 and row["artifacts_mb"] > 0.19
    assert abs(row["total_mb"] - row[[c for c in table.columns if c.endswith("_mb") and c != "total_mb"]].sum()) < 1e-9

    # a study with a live trial is not pruned
    host = socket.gethostname()
    live = client.create_run(client.get_experiment_by_name("tiny-cifar10").experiment_id, tags={
        "search.role": "trial", "optuna.study": "tiny-cifar10", "optuna.trial_number": "99",
        "search.state": "RUNNING", "search.host": host, "search.pid": str(os.getpid())}).info.run_id
    assert results_main(["--prune", "tiny-cifar10"]) == 2
    assert "is running" in capsys.readouterr().err
    client.set_terminated(live, "KILLED")

    (workdir / "checkpoints" / "tiny-cifar10" / "trial-7").mkdir(parents=True, exist_ok=True)  # an empty one
    assert results_main(["--prune", "tiny-cifar10"]) == 0
    said = capsys.readouterr().out
    assert f"trial {best}'s model, the best, is kept" in said and "freed" in said, said
    left = sorted(p.name for p in (workdir / "models" / "tiny-cifar10").iterdir())
    assert left == [f"trial-{best}.keras", f"trial-{best}.predictions.npz"]  # its model and its saved answers
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert client.list_artifacts(run.info.run_id) == [] and run.data.tags["search.artifacts_pruned"] == "true"
    assert not (workdir / "checkpoints" / "tiny-cifar10").exists()
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert client.list_artifacts(best_run, "evaluation")  # a completed trial's records stay
    after, _ = disk_usage(["tiny-cifar10"], workdir=str(workdir))
    assert after.loc[0, "kept_models"] == 1 and after.loc[0, "total_mb"] < row["total_mb"] - 0.19
    assert results_main(["--prune", "nosuch"]) == 2


# ---------------------------------------------------------------- live progress inside long work


def test_epochs_and_embedding_show_a_live_line_with_count_and_rate(monkeypatch, capsys):
    import keras
    import numpy as np

    from runners import progress
    from runners.callbacks import Progress

    monkeypatch.setenv("SEARCH_PROGRESS", "1")  # as on a terminal
    assert progress.shown()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((64, 4), "float32"), np.eye(2, dtype="float32")[np.zeros(64, int)]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y),
              callbacks=[Progress(0, 1, 1, 1, None)])
    err = capsys.readouterr().err
    assert "trial 0 epoch 1/1" in err and "/8 [" in err and "batch/s" in err  # count of the epoch's batches, rate

    from runners import transfer

    backbone = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3)])
    embed = transfer.embedder(backbone, transfer.BACKBONES["efficientnet_lite0"], 32, batch_size=16)
    average, maximum = embed(np.zeros((40, 32, 32, 3), "uint8"))
    assert average.shape == (40, 4) and maximum.shape == (40, 4)
    err = capsys.readouterr().err
    assert "embedding with efficientnet_lite0" in err and "/40 [" in err and "img/s" in err
    monkeypatch.setenv("SEARCH_PROGRESS", "0")
    assert not progress.shown()
    embed(np.zeros((40, 32, 32, 3), "uint8"))  # a few photos in a log: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "LOG_MIN_ITEMS", 20)  # as many as minutes of work, in a log: plain lines
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    embed(np.zeros((40, 32, 32, 3), "uint8"))
    err = capsys.readouterr().err
    assert "\r" not in err and "embedding with efficientnet_lite0" in err and "40/40 [" in err and "img/s" in err


def test_a_failed_trial_is_one_line_and_a_surplus_trial_says_nothing():
    import logging

    import search  # noqa: F401  (installs the filter)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna.study._optimize")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("unknown optimizer 'nosuchopt'")
        except ValueError as err:
            logger.warning(f"Trial 3 failed with parameters: {{}} because of the following error: {err!r}.",
                           exc_info=True)
        logger.warning("Trial 4 failed with parameters: {} because of the following error: "
                       "SurplusTrial('study already has 2 trials').", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].exc_info is None and "unknown optimizer" in records[0].getMessage()
