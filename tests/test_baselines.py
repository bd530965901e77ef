"""The hand-made baselines: the space spells out the seed studies' models exactly, and --baselines runs them first."""
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import TINY_SPACE, write_space
from runners.scratch_cnn import build_model
from search.config import SearchConfig
from search.results import leaderboard
from search.space import SpaceError, baseline_trials, default_params, load_space
from search.drivers import run_search


@pytest.mark.parametrize("architecture, image_size, millions", [
    ("seed_dogs", 224, 1.4), ("seed_dogs_stride1", 224, 7.5), ("reference_dogs", 128, 1.2)])
def test_the_dogs_models_of_the_seed_studies_have_their_published_sizes(architecture, image_size, millions):
    space = load_space("scratch_cnn", "stanford_dogs")
    params = {**default_params(space), "architecture": architecture, "width": 1.0}
    model = build_model(params, image_size, 120, space.architectures)
    assert abs(model.count_params() / 1e6 - millions) < 0.1


def test_the_cifar_baselines_put_the_best_known_cell_first_then_the_whole_grid():
    space = load_space("scratch_cnn", "cifar10")
    trials = baseline_trials(space)
    name, best = trials[0]
    assert name == "seed_cifar_best"
    assert best | {"architecture": "seed_cifar", "loss": "mean_squared_error", "learning_rate": 0.001,
                   "dropout": 0.3, "pooling": "average", "batch_size": 128, "optimizer": "adam"} == best
    grid = [p for n, p in trials if n.startswith("seed_cifar_grid")]
    assert len(grid) == 2 * 3 * 2 * 2 - 1            # the best cell is in the grid too, and runs once
    assert len({tuple(sorted(p.items())) for _, p in trials}) == len(trials)
    assert trials[-1][1]["architecture"] == "seed_cifar_wide"


def test_a_baseline_with_a_value_the_space_does_not_allow_is_refused(tmp_path):
    raw = yaml.safe_load(TINY_SPACE)
    raw["baselines"] = {"cifar10": [{"name": "mine", "params": {"learning_rate": 0.5}}]}
    path = write_space(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpaceError, match=r"baselines 'mine'.params.learning_rate: 0.5 is not a value"):
        load_space(str(path))


def test_an_architecture_with_an_unknown_pooling_is_refused(tmp_path):
    raw = yaml.safe_load(TINY_SPACE)
    raw["architectures"] = {"mine": {"blocks": [{"filters": 8, "pool": "min"}]}}
    path = write_space(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpaceError, match=r"architectures.mine.blocks\[0\].pool: one of max, average, none, param"):
        load_space(str(path))


BASELINE_SPACE = TINY_SPACE.replace("params:\n  image_size: 32\n", """params:
  image_size: 32
  architecture: {type: categorical, choices: [generated, hand_made], default: generated}
""") + """
architectures:
  hand_made: {blocks: [{filters: 8, kernel: 3, pool: max}, {filters: 16, strides: 2, pool: average}],
              head: flatten, dense: [32], batch_norm: false, residual: false}
baselines:
  cifar10:
    - name: best_known
      params: {architecture: hand_made, learning_rate: 0.005, loss: mean_squared_error}
    - name: grid
      params: {architecture: hand_made}
      grid: {pooling: [max, average]}
"""


@pytest.mark.slow
def test_baselines_run_first_and_are_marked_in_both_stores_and_the_leaderboard(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, BASELINE_SPACE)
    run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=4, baselines=True))
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    first = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs.get("baseline") for t in first[:3]] == ["best_known", "grid pooling=max", "grid pooling=average"]
    assert first[0].params["learning_rate"] == 0.005 and first[0].params["architecture"] == "hand_made"
    assert "baseline" not in first[3].user_attrs                      # then the search goes on
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(first[0].user_attrs["mlflow_run_id"])
    assert run.data.tags["search.baseline"] == "best_known"
    table = leaderboard(["tiny-cifar10"], workdir=str(workdir))
    assert set(table.loc[table["trial"] == 0, "source"]) == {"baseline:best_known"}


@pytest.mark.slow
def test_accuracy_against_size_is_a_multi_objective_study_with_a_constraint(cifar_dir, workdir, tiny_space):
    config = SearchConfig(space=str(tiny_space), data_dir=str(cifar_dir), trials=3, sampler="tpe",
                          objectives="val_accuracy,params", max_params=20_000)
    summary = run_search(config)
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.values[1] == t.user_attrs["param_count"] for t in done)
    assert all((t.constraints["max_params"] <= 0) == (t.user_attrs["param_count"] <= 20_000) for t in done)
    table = leaderboard(["tiny-cifar10"], workdir=str(workdir))
    assert set(table["feasible"].dropna()) <= {True, False}
    feasible = [t for t in done if t.user_attrs["param_count"] <= 20_000]
    assert summary.best_trial == (max(feasible, key=lambda t: t.values[0]).number if feasible else None)


def test_a_multi_objective_study_refuses_a_pruner(cifar_dir, workdir, tiny_space):
    from search.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot prune a multi-objective study"):
        run_search(SearchConfig(space=str(tiny_space), data_dir=str(cifar_dir), objectives="val_accuracy,params",
                                pruner="median"))


def test_a_time_budgeted_run_prunes_with_hyperband_over_the_spaces_epochs():
    from search.sampling import pruner_name

    assert pruner_name(SearchConfig(), timeout=3600, objectives=["val_accuracy"]) == "hyperband"
    assert pruner_name(SearchConfig(), timeout=None, objectives=["val_accuracy"]) == "median"
    assert pruner_name(SearchConfig(pruner="sha"), timeout=3600, objectives=["val_accuracy"]) == "sha"


def test_a_model_over_the_spaces_compute_budget_is_rejected_before_training(cifar_dir, workdir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("subset: 300}", "subset: 300, max_mflops: 0.01}"))
    run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), trials=1))
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and not trial.intermediate_values
    assert "over the space's budget.max_mflops (0)" in trial.user_attrs["end_reason"]


@pytest.mark.slow
def test_the_leaderboard_at_equal_fidelity_ranks_trials_by_their_first_n_epochs(cifar_dir, workdir, tiny_space):
    from search.results import at_epochs

    run_search(SearchConfig(space=str(tiny_space), data_dir=str(cifar_dir), trials=2, epochs=2, pruner="none",
                            sampler="random"))
    table = leaderboard(["tiny-cifar10"], workdir=str(workdir))
    assert set(table["budget"]) == {1.0}                         # both trained the full 2 epochs
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    first = {row.trial: client.get_metric_history(row.run_id, "val_accuracy") for row in table.itertuples()}
    ranked = at_epochs(table, 1, workdir=str(workdir))
    expected = sorted(first, key=lambda t: (-next(m.value for m in first[t] if m.step == 1), t))
    assert list(ranked["trial"]) == expected and set(ranked["epochs"]) == {1}
    assert at_epochs(table, 3, workdir=str(workdir)).empty       # no trial reached 3 epochs
