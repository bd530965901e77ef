"""Keras Tuner as a second driver: the same space file, the same runner, the same MLflow records as Optuna."""
import keras_tuner as kt
import pytest
from mlflow import MlflowClient

from conftest import TINY_SPACE, write_space
from search import results
from search import space as spaces
from search.config import SearchConfig
from search.drivers import run_search
from search.errors import SearchAborted

STUDY = "tiny-cifar10-kerastuner"


def kt_config(space, cifar_dir, workdir, **changes) -> SearchConfig:
    return SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(workdir), driver="kerastuner",
                        **changes)


def runs_of(workdir, study=STUDY):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = sorted((r for r in runs if r.data.tags.get("search.role") == "trial"),
                    key=lambda r: int(r.data.tags["optuna.trial_number"]))
    return client, trials, [r for r in runs if r.data.tags.get("search.role") == "invocation"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One workdir (MLflow store) for this module's studies: a fresh store costs seconds to create."""
    return tmp_path_factory.mktemp("kerastuner") / "mlruns"


@pytest.fixture(scope="module")
def hyperband_study(cifar_dir, store):
    """Hyperband over 3 epochs: three 1-epoch trials, then the best one continued to epoch 3."""
    workdir = store
    config = kt_config(write_space(store.parent, TINY_SPACE), cifar_dir, workdir, tuner="hyperband", trials=4,
                       epochs=3)
    return config, run_search(config), workdir


# ---------------------------------------------------------------- one declaration, two drivers


def test_the_space_translates_to_keras_tuner_hyperparameters(tiny_space):
    space = spaces.load_space(str(tiny_space))
    hp = kt.HyperParameters()
    values = spaces.declare_hyperparameters(hp, space)
    kinds = {p.name: type(p).__name__ for p in hp.space}
    assert kinds["image_size"] == "Fixed" and kinds["filters"] == "Choice" and kinds["conv_blocks"] == "Int"
    assert hp._hps["learning_rate"][0].sampling == "log"
    assert values == spaces.default_params(space)  # defaults carry over, booleans stay booleans
    assert values["batch_norm"] is True


def test_conditional_parameters_are_active_only_under_their_parent(tiny_space):
    space = spaces.load_space(str(tiny_space))
    hp = kt.HyperParameters()
    spaces.declare_hyperparameters(hp, space)
    hp.values.update(dense_layers=0, optimizer="sgd")
    hp.ensure_active_values()
    values = spaces.declare_hyperparameters(hp, space)
    assert "dense_units" not in values and 0.8 <= values["momentum"] <= 0.95


# ---------------------------------------------------------------- Hyperband


@pytest.mark.slow
def test_every_hyperband_trial_is_a_nested_mlflow_run_with_its_params(hyperband_study):
    config, summary, workdir = hyperband_study
    assert summary.study_name == STUDY and summary.counted == 4 and summary.trials_run == 4
    client, trials, parents = runs_of(workdir)
    assert len(parents) == 1 and parents[0].data.tags["search.driver"] == "kerastuner"
    assert [int(r.data.tags["optuna.trial_number"]) for r in trials] == [0, 1, 2, 3]
    space = spaces.load_space(config.space)
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.study"] == STUDY and run.data.tags["search.driver"] == "kerastuner"
        assert run.data.tags["search.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert set(spaces.default_params(space)) - {"dense_units", "momentum"} <= set(run.data.params)


def test_a_continued_hyperband_trial_logs_the_epochs_it_trained(hyperband_study):
    _, _, workdir = hyperband_study
    client, trials, _ = runs_of(workdir)
    first_round, continued = trials[:3], trials[3]
    for run in first_round:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert [m.step for m in client.get_metric_history(continued.info.run_id, "val_accuracy")] == [2, 3]
    assert continued.data.tags["kerastuner.initial_epoch"] == "1"
    assert int(continued.data.tags["kerastuner.parent_trial"]) in (0, 1, 2)


def test_a_kerastuner_trial_has_the_summary_metrics_of_an_optuna_trial(hyperband_study):
    _, summary, workdir = hyperband_study
    client, trials, parents = runs_of(workdir)
    for metric in ("best_val_accuracy", "test_accuracy", "test_top3_accuracy", "train_seconds", "trial_seconds",
                   "inference_ms", "param_count", "epochs_run"):
        assert all(metric in run.data.metrics for run in trials), metric
    for metric in ("loss", "accuracy", "val_top3_accuracy", "learning_rate", "epoch_seconds"):
        assert client.get_metric_history(trials[0].info.run_id, metric)
    assert parents[0].data.metrics["best_val_accuracy"] == pytest.approx(summary.best_value)
    assert "search.model_uri" in trials[summary.best_trial].data.tags


def test_the_keras_tuner_directory_lives_under_the_workdir(hyperband_study):
    _, summary, workdir = hyperband_study
    assert (workdir / "kerastuner" / STUDY / "oracle.json").is_file()


# ---------------------------------------------------------------- Bayesian and random


@pytest.mark.slow
def test_a_bayesian_study_records_every_trial(cifar_dir, store, tiny_space):
    summary = run_search(kt_config(tiny_space, cifar_dir, store, tuner="bayesian", trials=3, study_name="bayes"))
    client, trials, _ = runs_of(store, "bayes")
    assert summary.counted == 3 and len(trials) == 3
    assert {r.data.tags["search.source"] for r in trials} == {"kerastuner:bayesian"}
    assert all(r.data.tags["search.state"] == "COMPLETE" for r in trials)


@pytest.mark.slow
def test_a_random_study_resumes_from_its_keras_tuner_directory(cifar_dir, store, tiny_space):
    config = kt_config(tiny_space, cifar_dir, store, tuner="random", trials=2, study_name="resumed")
    assert run_search(config).trials_run == 2
    assert run_search(config).trials_run == 0  # target met: nothing to add
    config.trials = 3
    again = run_search(config)
    assert again.trials_run == 1 and again.counted == 3
    _, trials, parents = runs_of(store, "resumed")
    assert [int(r.data.tags["optuna.trial_number"]) for r in trials] == [0, 1, 2] and len(parents) == 3
    assert len(list((store / "kerastuner" / "resumed").glob("trial_*"))) == 3


def test_an_architecture_too_deep_for_the_images_is_pruned_not_failed(cifar_dir, store, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("strides: 1", "strides: 2").replace(
        "conv_blocks: {type: int, low: 1, high: 2, default: 2}", "conv_blocks: 4"))
    summary = run_search(kt_config(space, cifar_dir, store, tuner="random", trials=2, max_failures=1,
                                   study_name="too-deep"))
    _, trials, _ = runs_of(store, "too-deep")
    assert summary.counted == 2
    assert [r.data.tags["search.state"] for r in trials] == ["PRUNED", "PRUNED"]
    assert "below 1x1" in trials[0].data.tags["search.reason"]


def test_too_many_failures_in_a_row_stop_with_the_last_reason(cifar_dir, store, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace(
        "optimizer: {type: categorical, choices: [adam, sgd], default: adam}", "optimizer: nosuchopt").replace(
        "when: {optimizer: [sgd]}", "when: {optimizer: [nosuchopt]}"))
    with pytest.raises(SearchAborted, match="2 trials failed in a row.*unknown optimizer"):
        run_search(kt_config(space, cifar_dir, store, tuner="random", trials=3, max_failures=2, study_name="broken"))
    _, trials, parents = runs_of(store, "broken")
    assert [r.info.status for r in trials] == ["FAILED", "FAILED"]
    assert "unknown optimizer" in trials[0].data.tags["search.reason"]
    assert parents[0].info.status == "FAILED"


# ---------------------------------------------------------------- side by side with Optuna


@pytest.mark.slow
def test_compare_puts_an_optuna_and_a_kerastuner_study_side_by_side(hyperband_study, cifar_dir, tmp_path):
    config, kt_summary, workdir = hyperband_study
    optuna_summary = run_search(SearchConfig(space=config.space, data_dir=str(cifar_dir), workdir=str(workdir),
                                             trials=2, epochs=1, sampler="random"))
    table, costs = results.compare(["tiny-cifar10", STUDY], workdir=str(workdir))
    assert table["study"].tolist() == ["tiny-cifar10", STUDY]
    assert table["driver"].tolist() == ["optuna", "kerastuner"]
    assert table["trials"].tolist() == [2, 4]
    assert table["best_val_accuracy"].tolist() == pytest.approx([optuna_summary.best_value, kt_summary.best_value])
    assert table["best_trial"].tolist() == [optuna_summary.best_trial, kt_summary.best_trial]
    assert (table["compute_seconds"] > 0).all() and (table["seconds_to_best"] <= table["compute_seconds"]).all()
    best_so_far = costs[costs["study"] == STUDY]["best_so_far"].dropna().tolist()
    assert best_so_far == sorted(best_so_far)


def test_compare_on_the_command_line_prints_the_table_and_writes_the_plot(hyperband_study, tmp_path, capsys):
    _, _, workdir = hyperband_study
    assert results.main(["--workdir", str(workdir), "--compare", STUDY, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert STUDY in out and "compute_seconds" in out
    assert (tmp_path / "plots" / f"compare-{STUDY}.png").stat().st_size > 1000


def test_compare_names_an_unknown_study(hyperband_study, capsys):
    _, _, workdir = hyperband_study
    assert results.main(["--workdir", str(workdir), "--compare", "no-such-study"]) == 2
    assert "no study named 'no-such-study'" in capsys.readouterr().err


# ---------------------------------------------------------------- every driver with every runner


def test_a_kerastuner_trial_is_held_to_the_space_max_mflops(cifar_dir, store, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("subset: 300}", "subset: 300, max_mflops: 0.001}"))
    summary = run_search(kt_config(space, cifar_dir, store, tuner="random", trials=2, study_name="too-big"))
    _, trials, _ = runs_of(store, "too-big")
    assert summary.counted == 2 and [r.data.tags["search.state"] for r in trials] == ["PRUNED", "PRUNED"]
    assert "over the space's budget.max_mflops" in trials[0].data.tags["search.reason"]


@pytest.mark.slow
def test_kerastuner_drives_the_transfer_space_registers_its_model_and_reports(dogs_dir, tmp_path):
    workdir = tmp_path / "mlruns"
    config = SearchConfig(space="transfer", dataset="stanford_dogs", data_dir=str(dogs_dir), breeds="3",
                          image_size=96, subset=30, backbone="efficientnet_lite0", driver="kerastuner",
                          tuner="random", trials=2, epochs=2, workdir=str(workdir), report=True)
    summary = run_search(config)
    study = "transfer-stanford_dogs-kerastuner"
    client, trials, _ = runs_of(workdir, study)
    assert summary.study_name == study and summary.counted == 2 and len(trials) == 2
    assert all(r.data.tags["search.backbone"] == "efficientnet_lite0" for r in trials
               if r.data.tags["search.state"] == "COMPLETE")
    assert client.get_registered_model(f"{study}-best").latest_versions
    report_runs = client.search_runs([client.get_experiment_by_name(study).experiment_id],
                                     filter_string="tags.`search.role` = 'study'")
    assert report_runs and any(a.path == "report" for a in client.list_artifacts(report_runs[0].info.run_id))
