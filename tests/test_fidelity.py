"""Hyperband over real cost (`fidelity.resource: cost`): each explored trial gets the work of the default's epochs,
and reports its validation accuracy at steps that count work (search/fidelity.py)."""
import optuna
import pytest
from optuna.trial import TrialState

from search.config import SearchConfig
from search.drivers import run_search
from search.errors import ConfigError
from search.fidelity import TrialFidelity, rung_range, trial_fidelity
from search.sampling import make_pruner
from conftest import write_space, TINY_SPACE

COST_SPACE = """
name: cost
model: scratch_cnn
dataset: cifar10
budget: {trials: 4, epochs: 2, patience: 8, subset: 300}
fidelity: {resource: cost, min_epochs: 1, reduction_factor: 3}
params:
  image_size: 32
  conv_blocks: 2
  filters: {type: categorical, choices: [4, 16], default: 16}
  kernel_size: 3
  strides: 1
  pooling: max
  batch_norm: true
  dense_layers: 0
  dropout: 0.0
  optimizer: adam
  learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true, default: 3.0e-3}
  loss: categorical_crossentropy
  batch_size: 64
  augmentation: none
recipes:
  none: []
baselines:
  cifar10:
    - name: narrow              # a model a fraction of the default's cost, run first with --baselines
      params: {filters: 4}
"""


def test_a_cheaper_model_trains_more_epochs_for_the_same_work_and_a_costlier_one_fewer():
    default = trial_fidelity("cost", 4, 268.0, 268.0)
    assert default.epochs == 4 and [default.step(e) for e in range(4)] == [10, 20, 30, 40]
    third = trial_fidelity("cost", 4, 268.0 / 3, 268.0)
    assert third.epochs == 12 and third.step(11) == 40  # three times the epochs, the same work at the end
    double = trial_fidelity("cost", 4, 536.0, 268.0)
    assert double.epochs == 2 and [double.step(e) for e in range(2)] == [20, 40]
    tiny = trial_fidelity("cost", 4, 1.0, 268.0)
    assert tiny.epochs == 16  # at most 4x the space's epochs: each epoch also pays validation and overhead
    assert [tiny.step(e) for e in range(tiny.epochs)] == list(range(1, 17))  # each epoch at a new step
    # resource epochs, or a configuration that cannot be priced: Optuna's steps, epoch numbers from 0
    assert trial_fidelity("epochs", 4, 1.0, 268.0) == TrialFidelity(4)
    assert trial_fidelity("cost", 4, None, 268.0) == TrialFidelity(4)
    assert [TrialFidelity(3).step(e) for e in range(3)] == [0, 1, 2]


def test_the_pruners_rungs_are_counted_in_the_resources_steps():
    assert rung_range("epochs", 4, 1) == (1, 4) and rung_range("cost", 4, 1) == (10, 40)
    study = optuna.create_study(direction="maximize", pruner=make_pruner("sha", 4, 1, 3, "cost"))
    for value in (0.9, 0.8, 0.7):
        trial = study.ask()
        trial.report(value, 10)
        trial.should_prune()  # records the trial's value at the rung, for later trials to compete with
        study.tell(trial, value)
    late = study.ask()
    late.report(0.1, 5)  # half a default epoch's work: before the first rung, nothing is cut
    assert not late.should_prune()
    late.report(0.1, 10)  # the worst after the same work as the others: cut
    assert late.should_prune()


def test_explored_trials_train_for_the_work_of_the_defaults_epochs(cifar_dir, tmp_path):
    from runners.scratch_cnn import build_model
    from runners.train import forward_flops

    space = write_space(tmp_path, COST_SPACE)
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      sampler="random", pruner="none", baselines=True))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4

    def mflops(filters):
        params = {"image_size": 32, "conv_blocks": 2, "filters": filters, "kernel_size": 3, "strides": 1,
                  "pooling": "max", "batch_norm": True, "dense_layers": 0, "dropout": 0.0}
        return forward_flops(build_model(params, 32, 10)) / 1e6

    for trial in done:
        planned = trial_fidelity("cost", 2, mflops(trial.params["filters"]), mflops(16))
        assert trial.user_attrs["epochs_run"] == planned.epochs
        assert sorted(trial.intermediate_values) == [planned.step(e) for e in range(planned.epochs)]
        assert trial.user_attrs["budget_fraction"] == pytest.approx(planned.epochs * planned.epoch_work / 2)
    default = [t for t in done if t.params["filters"] == 16][0]
    assert sorted(default.intermediate_values) == [10, 20]  # one step per tenth of the default's epoch's work
    cheap = [t for t in done if t.params["filters"] == 4]
    assert cheap and all(t.user_attrs["epochs_run"] > 2 for t in cheap)  # the cheaper model trained more epochs


def test_a_runner_that_cannot_price_a_configuration_refuses_resource_cost(tmp_path, dogs_dir):
    from conftest import ROOT

    space = tmp_path / "transfer.yaml"  # the shipped transfer space, told to count work
    space.write_text((ROOT / "spaces" / "transfer.yaml").read_text() + "\nfidelity: {resource: cost}\n")
    with pytest.raises(ConfigError, match="resource: cost needs a runner that prices"):
        run_search(SearchConfig(space=str(space), data_dir=str(dogs_dir), workdir=str(tmp_path / "mlruns")))
    assert not list((tmp_path / "mlruns").iterdir())  # refused before any store or cache was written


def test_keras_tuner_refuses_resource_cost_and_an_unknown_resource_is_named(cifar_dir, tmp_path):
    space = write_space(tmp_path, COST_SPACE)
    with pytest.raises(ConfigError, match="Keras Tuner's Hyperband counts epochs"):
        run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), driver="kerastuner",
                                workdir=str(tmp_path / "mlruns")))
    (tmp_path / "bad").mkdir()
    bad = write_space(tmp_path / "bad", TINY_SPACE + "fidelity: {resource: seconds}\n")
    with pytest.raises(ConfigError, match="resource: epochs or cost"):
        run_search(SearchConfig(space=str(bad), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns")))


def test_explored_trials_can_train_smaller_and_narrower_than_the_refit():
    from search.fidelity import explored_params
    from search.space import SpaceError, check_fidelity

    suggested = {"image_size": 128, "width": 1.5, "learning_rate": 0.01}
    assert explored_params(suggested, {"image_size": 0.75, "width": 0.5}) == {
        "image_size": 96, "width": 0.75, "learning_rate": 0.01}
    assert explored_params({"image_size": 32}, {"image_size": 0.25})["image_size"] == 16  # never below 16 px
    assert explored_params({"image_size": 32}, {"width": 0.5}) == {"image_size": 32, "width": 0.5}
    assert explored_params(suggested, {"resource": "cost"}) == suggested
    with pytest.raises(SpaceError, match=r"fidelity.width: the share explored trials train at, in \(0, 1\]"):
        check_fidelity({"width": 1.5}, "space.yaml: fidelity")


@pytest.mark.slow
def test_a_run_that_refits_explores_at_the_cheaper_size_and_width_and_refits_at_full(cifar_dir, tmp_path):
    from mlflow import MlflowClient

    space = write_space(tmp_path, TINY_SPACE + "fidelity: {resource: cost, image_size: 0.5, width: 0.5}\n")
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      trials=3, epochs=1, timeout=40, refit=0.5, sampler="random"))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")

    def trained(t):
        return client.get_run(t.user_attrs["mlflow_run_id"]).data.params

    explored = [t for t in study.trials if t.user_attrs.get("refit_of") is None and t.state == TrialState.COMPLETE]
    refits = [t for t in study.trials if t.user_attrs.get("refit_of") is not None and t.state == TrialState.COMPLETE]
    assert explored and all(trained(t)["image_size"] == "16" and trained(t)["width"] == "0.5" for t in explored)
    assert all(t.user_attrs["cheaper_fidelity"] for t in explored)
    assert all(t.params.get("image_size", 32) == 32 for t in explored)  # Optuna keeps what it suggested
    assert refits and all(trained(t)["image_size"] == "32" and "width" not in trained(t) for t in refits)
