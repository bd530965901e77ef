"""The core loop on real CIFAR-10: Optuna trials train real Keras CNNs and every trial lands in MLflow."""
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import write_space, TINY_SPACE
from search.config import SearchConfig
from search.results import leaderboard
from search.drivers import run_search
from search.errors import SearchAborted
from search.tracking import fluent_api


def trial_runs(study_name, workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("search.role") == "trial"], \
        [r for r in runs if r.data.tags.get("search.role") == "invocation"]


def three_trials(cifar_dir, folder):
    """Three random trials of the tiny space, run from `folder` (stores in folder/mlruns)."""
    config = SearchConfig(space=str(write_space(folder, TINY_SPACE)), data_dir=str(cifar_dir), trials=3,
                          sampler="random")
    return config, run_search(config)


@pytest.fixture(scope="module")
def short_study(cifar_dir, tmp_path_factory):
    """One 3-trial study that the read-only tests below share (each run costs about 15 s)."""
    folder = tmp_path_factory.mktemp("short-study")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("KERAS_HOME", str(folder / "keras_home"))
        return three_trials(cifar_dir, folder)


@pytest.fixture
def study_store(short_study, monkeypatch):
    """The shared study's stores (its mlruns folder), with cwd where they are the default ones."""
    folder = Path(short_study[0].space).parent
    monkeypatch.chdir(folder)
    return folder / "mlruns"


def test_every_trial_trains_and_is_recorded_in_both_stores(short_study, study_store):
    config, summary = short_study
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{study_store}/optuna.db")
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 3
    client, trials, parents = trial_runs("tiny-cifar10", study_store)
    assert len(parents) == 1 and len(trials) == len(study.trials)
    assert not config.report and not (study_store / "reports").exists()  # SEARCH_REPORT=0 (conftest): no report
    experiment = client.get_experiment_by_name("tiny-cifar10").experiment_id
    assert not client.search_runs([experiment], "tags.`search.role` = 'study'")
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status != "RUNNING"
        for name, value in t.params.items():
            assert run.data.params[name] == str(value)


def test_a_completed_trial_run_has_per_epoch_metrics_test_accuracy_and_costs(study_store):
    client, trials, _ = trial_runs("tiny-cifar10", study_store)
    run = next(r for r in trials if r.data.tags["search.state"] == "COMPLETE")
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "val_top3_accuracy", "learning_rate",
                   "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1]
    for metric in ("test_accuracy", "test_loss", "test_top3_accuracy", "train_seconds", "inference_ms",
                   "param_count", "best_val_accuracy"):
        assert metric in run.data.metrics
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.params["dataset"] == "cifar10" and run.data.params["subset"] == "300"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"cifar10"}


def test_the_parent_run_holds_the_space_environment_and_best(study_store):
    client, _, parents = trial_runs("tiny-cifar10", study_store)
    parent = parents[0]
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "environment.json", "space_resolved.json"} <= files
    assert "best_val_accuracy" in parent.data.metrics
    assert parent.data.tags["search.best_trial"].isdigit()
    env = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/environment.json")
    assert env["device"] == "CPU" and "tensorflow" in str(env["packages"])


def test_the_best_trials_model_is_logged_as_a_keras_model(short_study, study_store):
    config, summary = short_study
    client, trials, _ = trial_runs("tiny-cifar10", study_store)
    best = next(r for r in trials if r.data.tags["optuna.trial_number"] == str(summary.best_trial))
    with fluent_api(client.tracking_uri):
        model = mlflow.keras.load_model(best.data.tags["search.model_uri"])
    assert model.output_shape == (None, 10)


def test_the_leaderboard_puts_the_best_completed_trial_first(short_study, study_store):
    config, summary = short_study
    table = leaderboard(["tiny-cifar10"])
    assert len(table) >= 3
    assert table.iloc[0]["trial"] == summary.best_trial
    complete = table[table["state"] == "COMPLETE"]["val_accuracy"].tolist()
    assert complete == sorted(complete, reverse=True)


def test_running_again_resumes_and_adds_only_up_to_the_new_target(cifar_dir, workdir):
    config, _ = three_trials(cifar_dir, workdir.parent)  # its own study: this test adds to it
    again = run_search(config)  # same target: nothing to add
    assert again.trials_run == 0
    config.trials = 4
    more = run_search(config)
    assert more.counted == 4 and more.trials_run >= 1
    _, _, parents = trial_runs("tiny-cifar10", workdir)
    assert len(parents) == 3


def test_a_failing_trial_is_recorded_and_the_study_goes_on(cifar_dir, workdir, tmp_path):
    text = TINY_SPACE.replace("optimizer: {type: categorical, choices: [adam, sgd], default: adam}",
                              "optimizer: {type: categorical, choices: [nosuchopt, adam, sgd], default: nosuchopt}")
    space = write_space(tmp_path, text)
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=2, sampler="random",
                                      seed=3))
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and "unknown optimizer 'nosuchopt'" in failed[0].user_attrs["fail_reason"]
    assert summary.counted == 2
    client, trials, _ = trial_runs("tiny-cifar10", workdir)
    run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["search.state"] == "FAIL"
    assert "unknown optimizer" in run.data.tags["search.reason"]


def test_too_many_failures_in_a_row_stop_with_the_last_reason(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace(
        "optimizer: {type: categorical, choices: [adam, sgd], default: adam}", "optimizer: nosuchopt").replace("when: {optimizer: [sgd]}", "when: {optimizer: [nosuchopt]}"))
    with pytest.raises(SearchAborted, match="2 trials failed in a row.*unknown optimizer"):
        run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=3, max_failures=2))


def test_an_architecture_that_shrinks_below_one_pixel_is_pruned_before_training(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("strides: 1", "strides: 4").replace(
        "conv_blocks: {type: int, low: 1, high: 2, default: 2}", "conv_blocks: 3"))
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=1))
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    assert study.trials[0].state == TrialState.PRUNED
    assert "below 1x1" in study.trials[0].user_attrs["end_reason"]
    assert summary.counted == 1


def test_a_new_tpe_study_starts_at_the_default_then_near_it_before_tpe_suggests(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, TINY_SPACE.replace("params:", "start: near_default\nparams:", 1))
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=4, subset=100))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    sources = [t.user_attrs.get("source", "sampler") for t in study.trials]
    assert sources == ["default", "near-default", "near-default", "sampler"]  # TPE's 3 start-up trials, then TPE


def test_perturbations_of_the_default_stay_valid_and_mostly_near_it():
    import numpy as np

    from search import space as spaces
    from search.sampling import near_default

    space = spaces.load_space("scratch_cnn")
    default = spaces.default_params(space)
    rng = np.random.default_rng(0)
    drawn = [near_default(space, rng) for _ in range(300)]
    for params in drawn:
        assert params == spaces.complete_params(space, params)  # every value valid, every condition followed
    # NEAR_DEFAULT_CHANGES = 2 (a number may round to its default; parameters a change switches on or off aside)
    moved = [sum(params[name] != value for name, value in default.items() if name in params) for params in drawn]
    assert max(moved) <= 2 and np.mean(moved) > 1.5
    rates = np.array([params["learning_rate"] for params in drawn if params["learning_rate"] != default["learning_rate"]])
    assert 0.5 < np.median(rates / default["learning_rate"]) < 2 and len(rates) > 10
