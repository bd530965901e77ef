"""Shared fixtures: one materialised CIFAR-10 per session, the shared Stanford Dogs copy, small spaces."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_postgres import postgres  # noqa: F401  (the session's PostgreSQL cluster fixture)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores
os.environ.setdefault("SEARCH_REPORT", "0")  # the study report (~4 s of pictures a run) only where a test asks for it

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (tests expect ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """CIFAR-10 in the official python format, written once per session from ../shared."""
    script = shared("cifar10", "materialize.py")
    dest = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(script), str(dest)], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def dogs_dir() -> Path:
    """The shared Stanford Dogs copy (120 breeds x 100 images, official layout, no lists/)."""
    return shared("stanford_dogs")


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """A search run in this process sets Keras's precision policy (bfloat16 on CPUs that have it): reset it, so
    tests that build models themselves compute in float32 whatever ran before them."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working folder: the stores and caches of one test, with cwd inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path / "mlruns"


def write_space(folder: Path, text: str) -> Path:
    """A space file written for one test."""
    path = folder / "space.yaml"
    path.write_text(text)
    return path


TINY_SPACE = """
name: tiny
model: scratch_cnn
dataset: cifar10
budget: {trials: 3, epochs: 1, patience: 1, subset: 300}
params:
  image_size: 32
  conv_blocks: {type: int, low: 1, high: 2, default: 2}
  filters: {type: categorical, choices: [8, 16], default: 16}
  kernel_size: 3
  strides: 1
  pooling: {type: categorical, choices: [max, average], default: max}
  batch_norm: {type: categorical, choices: [true, false], default: true}
  dense_layers: {type: int, low: 0, high: 1, default: 1}
  dense_units: {type: categorical, choices: [32, 64], default: 64, when: {dense_layers: [1]}}
  dropout: {type: float, low: 0.0, high: 0.5, default: 0.2}
  optimizer: {type: categorical, choices: [adam, sgd], default: adam}
  momentum: {type: float, low: 0.8, high: 0.95, default: 0.9, when: {optimizer: [sgd]}}
  learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true, default: 3.0e-3}
  loss: {type: categorical, choices: [categorical_crossentropy, mean_squared_error], default: categorical_crossentropy}
  batch_size: {type: categorical, choices: [32, 64], default: 64}
  augmentation: {type: categorical, choices: [none, flip], default: none}
recipes:
  none: []
  flip: [{HorizontalFlip: {p: 0.5}}]
"""


@pytest.fixture
def tiny_space(tmp_path) -> Path:
    """A small, fast space over the same dimensions as scratch_cnn."""
    return write_space(tmp_path, TINY_SPACE)
