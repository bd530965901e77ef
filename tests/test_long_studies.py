"""Long searches that can be trusted: the study stops when it stops paying, and any row can be re-run."""
import optuna
import pytest
from mlflow import MlflowClient

from conftest import write_space, TINY_SPACE
from search.config import SearchConfig
from search.rerun import rerun
from search.drivers import run_search


def test_study_patience_stops_a_study_that_cannot_improve_and_says_why(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE)
    # no trial can beat another by 50 points on 300 images in one epoch: patience must end it after 1 + 3
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=10, study_patience=3,
                                      min_improvement=0.5, sampler="random"))
    assert summary.stopped == "patience" and summary.counted == 4
    parent = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(summary.parent_run_id)
    assert parent.data.tags["search.stopped"] == "patience"
    assert parent.data.tags["search.stopped_by"] == "trials" and parent.data.tags["search.stopped_window"] == "3"


def test_the_memory_watch_counts_live_memory_not_garbage_in_reference_cycles():
    import numpy as np
    from search.stopping import MemoryWatch

    class Study:  # what MemoryWatch calls on Optuna's study
        stopped = False

        def stop(self):
            self.stopped = True

    watch, study = MemoryWatch(limit_mb=100), Study()
    watch(study, None)  # the baseline, after the first trial
    for _ in range(3):  # what a pruned trial leaves: its exception's frames, holding its arrays, in a cycle
        cycle = {"features": np.ones((200, 2 ** 20 // 8))}  # 200 MB, touched
        cycle["self"] = cycle
        del cycle
        watch(study, None)
    assert not study.stopped and watch.reason is None
    kept = [np.ones((200, 2 ** 20 // 8))]  # live memory does count
    watch(study, None)
    assert study.stopped and "restarting the worker" in watch.reason
    del kept


def test_rerun_reproduces_a_trials_validation_accuracy(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("epochs: 1", "epochs: 2"))
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=1))
    again = rerun(f"tiny-cifar10:{summary.best_trial}")
    assert abs(again["val_accuracy"] - again["original_val_accuracy"]) <= 0.005
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    original = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert original.data.tags["search.rerun_command"] == "python -m search.run --rerun tiny-cifar10:0"
    assert client.get_run(again["run_id"]).data.tags["search.rerun_of"] == "tiny-cifar10:0"


def test_a_resumed_fit_trains_epochs_3_and_4_as_an_uninterrupted_one_does(cifar_dir, workdir, tmp_path):
    from runners import scratch_cnn
    from runners.datasets import load_dataset
    from runners.pipeline import EpochOrder
    from search import space as spaces

    # the pipeline: a resumed epoch order draws what the uninterrupted one draws in that epoch
    whole, resumed = EpochOrder(50, 16, seed=7), EpochOrder(50, 16, seed=7, first_epoch=2)
    third = [list(whole()) for _ in range(3)][2]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(third, resumed()))
    # the fit: epochs 3-4 after a checkpoint at epoch 2 match epochs 3-4 of one 4-epoch fit
    space = spaces.load_space(str(write_space(tmp_path, TINY_SPACE)))
    params = {**spaces.default_params(space), "augmentation": "flip"}
    data = load_dataset("cifar10", data_dir=str(cifar_dir), image_size=32, subset=200, workdir=workdir)
    common = dict(patience=4, seed=3, recipes=space.recipes, evaluate_test=False)
    straight = scratch_cnn.train_and_evaluate(params, data, epochs=4, **common).history
    folder = tmp_path / "checkpoint"
    scratch_cnn.train_and_evaluate(params, data, epochs=2, checkpoint=folder, **common)
    again = scratch_cnn.train_and_evaluate(params, data, epochs=4, checkpoint=folder, **common)
    assert again.resumed_from_epoch == 2 and again.epochs_run == 4
    for key in ("loss", "val_loss", "val_accuracy"):  # equal here; a tolerance for other CPUs' rounding
        assert again.history[key] == pytest.approx(straight[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_a_killed_trial_resumes_from_its_last_epoch(cifar_dir, tmp_path):
    import contextlib
    import json
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import ROOT

    space = write_space(tmp_path, TINY_SPACE.replace("epochs: 1, patience: 1, subset: 300",
                                                     "epochs: 4, patience: 4, subset: 2000"))
    args = [sys.executable, "-m", "search.run", "--space", str(space), "--data-dir", str(cifar_dir), "--trials", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "mlruns" / "checkpoints" / "tiny-cifar10" / "trial-0" / "state.json"
    deadline = time.time() + 180
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 2) and time.time() < deadline:
        time.sleep(0.05)  # the checkpoint comes first; then the epoch is logged (the MLflow store exists by now)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")) as db:  # quicker than a client
        while time.time() < deadline and db.execute(
                "select count(*) from metrics where key = 'val_accuracy' and step = 2").fetchone()[0] == 0:
            time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.time() * 1000
    assert json.loads(state.read_text())["epoch"] == 2, "epochs too fast for this test: epoch 3 ended before the kill"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-cifar10").experiment_id

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    old, new = study.trials
    assert (old.state, new.state) == (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE)
    assert old.user_attrs["resumed_as"] == 1 and new.user_attrs["resumes"] == 0 and new.params == old.params
    assert new.user_attrs["seed"] == old.user_attrs["seed"]
    assert sorted(new.intermediate_values) == [0, 1, 2, 3]
    # one run, continued: 4 values per metric, epochs 1-2 logged before the kill and never again
    (run,) = client.search_runs([exp], "tags.`search.role` = 'trial'")
    assert run.info.run_id == old.user_attrs["mlflow_run_id"] == new.user_attrs["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == "1"
    for key in ("loss", "accuracy", "top3_accuracy", "val_loss", "val_accuracy", "val_top3_accuracy",
                "learning_rate", "epoch_seconds"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3, 4], key
        assert all(m.timestamp < killed_at for m in history[:2]) and all(m.timestamp > killed_at for m in history[2:])
    # the second process trained 2 epochs: 2 restored + 2 trained (a retrained epoch 1 would make it 6)
    assert run.data.metrics["epochs_resumed_from"] == 2 and run.data.metrics["epochs_run"] == 4
    assert not list((tmp_path / "mlruns" / "checkpoints" / "tiny-cifar10").iterdir())


def test_a_resumed_study_does_not_replay_the_suggestions_it_already_tried(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE)
    for total in (2, 4):  # the second command resumes the study, as a worker restarted for memory does
        run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=total, sampler="random"))
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    first, resumed = [t.params for t in study.trials[:2]], [t.params for t in study.trials[2:]]
    assert len(resumed) == 2 and all(params not in first for params in resumed)
