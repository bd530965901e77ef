"""Long searches that can be trusted: the study stops when it stops paying, and any row can be re-run."""
import optuna
from mlflow import MlflowClient

from conftest import write_space, TINY_SPACE
from search.config import SearchConfig
from search.rerun import rerun
from search.study import run_search


def test_study_patience_stops_a_study_that_cannot_improve_and_says_why(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE)
    # no trial can beat another by 50 points on 300 images in one epoch: patience must end it after 1 + 3
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=10, study_patience=3,
                                      min_improvement=0.5, sampler="random"))
    assert summary.stopped == "patience" and summary.counted == 4
    parent = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(summary.parent_run_id)
    assert parent.data.tags["search.stopped"] == "patience"
    assert parent.data.tags["search.stopped_by"] == "trials" and parent.data.tags["search.stopped_window"] == "3"


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


def test_a_worker_over_its_memory_limit_restarts_and_the_study_completes(cifar_dir, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    space = write_space(tmp_path, TINY_SPACE)
    done = subprocess.run([sys.executable, "-m", "search.run", "--space", str(space), "--data-dir", str(cifar_dir),
                           "--trials", "3", "--max-memory-growth", "0.001"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("restarting with a fresh process") >= 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-cifar10")
    parents = client.search_runs([exp.experiment_id], "tags.`search.role` = 'invocation'")
    assert len(parents) >= 2 and any(p.data.tags.get("search.stopped") == "memory" for p in parents)
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
