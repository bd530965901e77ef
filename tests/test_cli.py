"""The command lines as a user types them: exit codes, messages without tracebacks, Ctrl-C, resuming."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import ROOT, write_space, TINY_SPACE


def run(*args, cwd, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_bad_space_file_exits_2_naming_the_file_and_key_without_traceback(tmp_path):
    space = write_space(tmp_path, "name: bad\nparams:\n  dropout: {type: float, low: 0.9, high: 0.1}\n")
    done = run("search.run", "--space", str(space), cwd=tmp_path)
    assert done.returncode == 2
    assert f"{space}: params.dropout: low (0.9) > high (0.1)" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_space_or_dataset_lists_the_available_ones(tmp_path):
    done = run("search.run", "--space", "nope", cwd=tmp_path)
    assert done.returncode == 2 and "Available: " in done.stderr and "scratch_cnn" in done.stderr
    done = run("search.run", "--dataset", "imagenet", cwd=tmp_path)
    assert done.returncode == 2 and "cifar10, stanford_dogs, folder:PATH" in done.stderr


def test_missing_data_says_where_to_put_it_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty Keras cache, whatever this machine has
    done = run("search.run", "--data-dir", str(tmp_path / "nothing"), cwd=tmp_path)
    assert done.returncode == 2
    assert "CIFAR-10 not found" in done.stderr and "cifar-10-batches-py" in done.stderr
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_an_unknown_study_in_results_exits_2_and_lists_known_ones(tmp_path):
    done = run("search.results", "--study", "nope", cwd=tmp_path)
    assert done.returncode == 2 and "no study named 'nope'" in done.stderr


@pytest.mark.slow
def test_ctrl_c_kills_the_running_trial_and_the_same_command_resumes(tmp_path, cifar_dir):
    space = write_space(tmp_path, TINY_SPACE.replace("epochs: 1", "epochs: 30").replace("patience: 1", "patience: 30"))
    args = ["search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # as from a terminal: Ctrl-C at its default even if this pytest worker's SIGINT was left ignored
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    for line in proc.stdout:  # wait until the first epoch has been trained and logged
        if "epoch 1/30" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command to resume" in err
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert study.trials[0].state == TrialState.FAIL
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = run(*args, "--epochs", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    # the interrupted trial was continued from its checkpoint, in its own run
    assert study.trials[1].user_attrs["resumes"] == 0 and study.trials[1].user_attrs["resumed_from_epoch"] >= 1
    assert study.trials[1].user_attrs["mlflow_run_id"] == run_id
    exp = client.get_experiment_by_name("tiny-cifar10")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_results_exports_every_format(tmp_path, cifar_dir, monkeypatch):
    from search.results import main as results_main

    space = write_space(tmp_path, TINY_SPACE)
    assert run("search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "2",
               "--quiet", cwd=tmp_path).returncode == 0
    done = run("search.results", "--study", "tiny-cifar10", "--format", "md", "--out", "board.md", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rank | study" in (tmp_path / "board.md").read_text()
    monkeypatch.chdir(tmp_path)  # the other formats through the same entry point, without a new interpreter each
    for fmt, marker in [("csv", "rank,study,trial"), ("html", "<table"), ("latex", "\\begin{tabular}")]:
        assert results_main(["--study", "tiny-cifar10", "--format", fmt, "--out", f"board.{fmt}"]) == 0
        assert marker in (tmp_path / f"board.{fmt}").read_text()


def test_ctrl_c_during_training_waits_for_the_next_batch_end_then_interrupts():
    from runners.callbacks import interrupts_at_batch_end

    # start from Python's own Ctrl-C handler, as in a terminal (a pytest-xdist worker was seen with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished_write = False
        with pytest.raises(KeyboardInterrupt):
            with interrupts_at_batch_end():
                os.kill(os.getpid(), signal.SIGINT)  # as if pressed during an epoch-end database write
                time.sleep(0.1)  # Python runs signal handlers between bytecodes: the handler has run by now
                finished_write = True
        assert finished_write and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
