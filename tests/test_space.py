"""Space files: the shipped ones load, bad ones are refused with the file, the key and what is allowed."""
import os

import optuna
import pytest

from conftest import write_space
from search.space import SpaceError, default_params, grid_of, load_space, shipped_spaces, suggest_params


def test_shipped_scratch_cnn_covers_every_dimension_the_seed_studies_varied():
    space = load_space("scratch_cnn")
    for name in ("strides", "dense_layers", "dropout", "pooling", "optimizer", "learning_rate", "loss",
                 "batch_size", "augmentation", "lr_schedule", "label_smoothing", "batch_norm"):
        assert name in space.params
    assert space.params["learning_rate"].log
    assert set(space.params["optimizer"].choices) == {"adam", "rmsprop", "sgd", "adamw"}
    assert space.params["momentum"].when == {"optimizer": ("sgd",)}


def test_dataset_overrides_replace_parameters():
    dogs = load_space("scratch_cnn", "stanford_dogs")
    assert dogs.params["image_size"].type == "categorical"
    assert load_space("scratch_cnn", "cifar10").params["image_size"].value == 32


def test_conditional_parameters_are_suggested_only_when_their_parent_allows():
    space = load_space("scratch_cnn")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        params = suggest_params(study.ask(), space)
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert ("weight_decay" in params) == (params["optimizer"] in ("adamw", "sgd"))
        assert ("dense_units" in params) == (params.get("dense_layers", 0) > 0)
        assert ("conv_blocks" in params) == (params["architecture"] == "generated")


def test_defaults_and_grid_are_built_from_the_file():
    space = load_space("scratch_cnn")
    assert default_params(space)["optimizer"] == "adamw"  # fast_cifar's recipe goes first
    assert "momentum" not in default_params(space)
    assert grid_of(space)["pooling"] == ["max", "average"]


def test_shipped_spaces_are_found_by_name():
    assert "scratch_cnn" in shipped_spaces()


@pytest.mark.parametrize("snippet, expected", [
    ("  dropout: {type: float, low: 0.6, high: 0.5}", "params.dropout: low (0.6) > high (0.5)"),
    ("  dropout: {type: categorical, choices: []}", "params.dropout.choices: must be a non-empty list"),
    ("  dropout: {type: float, low: zero, high: 0.5}", "params.dropout.low: a float range needs a number"),
    ("  dropout: {type: floaty, low: 0, high: 0.5}", "params.dropout.type: must be one of"),
    ("  dropout: {type: float, low: 0, hihg: 0.5}", "unknown key 'hihg' (did you mean 'high'?)"),
])
def test_a_bad_parameter_names_the_file_and_key(tmp_path, snippet, expected):
    path = write_space(tmp_path, f"name: bad\nparams:\n  image_size: 32\n{snippet}\n")
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_an_unknown_top_level_key_lists_the_allowed_ones(tmp_path):
    path = write_space(tmp_path, "name: bad\nbudjet: {trials: 3}\nparams: {image_size: 32}\n")
    with pytest.raises(SpaceError, match="unknown key 'budjet'.*allowed: .*budget"):
        load_space(str(path))


def test_an_unknown_recipe_transform_is_refused(tmp_path):
    path = write_space(tmp_path, "name: bad\nparams: {image_size: 32, augmentation: {type: categorical, "
                                 "choices: [r]}}\nrecipes: {r: [{NoSuchFlip: {p: 1}}]}\n")
    with pytest.raises(SpaceError, match="recipes.r: 'NoSuchFlip' is not an albumentations transform"):
        load_space(str(path))


def test_a_condition_must_name_an_earlier_parameter(tmp_path):
    path = write_space(tmp_path, "name: bad\nparams:\n  momentum: {type: float, low: 0.8, high: 0.9, "
                                 "when: {optimizer: [sgd]}}\n  optimizer: {type: categorical, choices: [sgd]}\n")
    with pytest.raises(SpaceError, match="'optimizer' must be a parameter defined before 'momentum'"):
        load_space(str(path))


def test_an_unknown_space_name_lists_the_available_ones():
    with pytest.raises(SpaceError, match="unknown space 'scratch'.*Available: .*scratch_cnn"):
        load_space("scratch")


def test_a_spaces_environment_is_set_before_tensorflow_starts_and_a_users_own_value_wins(
        tmp_path, cifar_dir, monkeypatch):
    import subprocess
    import sys

    from conftest import TINY_SPACE
    from search.config import SearchConfig
    from search.setup import prepare_run

    path = write_space(tmp_path, TINY_SPACE + "environment: {SEARCH_TEST_A: 1, SEARCH_TEST_B: \"on\"}\n")
    assert load_space(str(path)).environment == {"SEARCH_TEST_A": "1", "SEARCH_TEST_B": "on"}
    monkeypatch.delenv("SEARCH_TEST_A", raising=False)
    monkeypatch.setenv("SEARCH_TEST_B", "mine")
    prepare_run(SearchConfig(space=str(path), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns")))
    assert (os.environ["SEARCH_TEST_A"], os.environ["SEARCH_TEST_B"]) == ("1", "mine")
    # in a fresh process nothing the command imports before the space is read starts TensorFlow
    code = ("import sys, optuna, search.run, search.drivers, search.setup, search.results; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    with pytest.raises(SpaceError, match="environment: a mapping"):
        load_space(str(write_space(tmp_path, TINY_SPACE + "environment: [TF_CPU_ALLOCATOR_USE_BFC]\n")))
