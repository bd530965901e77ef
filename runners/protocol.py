"""The contract between the search and a model: what every runner module provides, and its errors.

A space file names its runner (`model: scratch_cnn`); both drivers (Optuna, Keras Tuner) train every trial
through these calls and nothing else, so any driver works with any runner:

    choices = runner.narrow_choices(choices, defaults, backbone=..., weights=...)  # once, before trial 1
    speed = runner.measure_speed(default_params, data, options={...})             # a time-budgeted run plans
    result = runner.train_and_evaluate(params, data, epochs=..., patience=..., seed=..., recipes=...,
                                       callbacks=[...], options={...}, checkpoint=folder)
    runner.release(result)                                                        # after each trial
    runner.forward_mflops(params, data, options={...})  # optional: a configuration's cost (fidelity.resource: cost)
    runner.evaluate_saved(path, params, data, options={...})  # optional: test a model trained without it (a screen)
    runner.ensemble_model(members, image_size)   # optional: several trials as one model (None: sum whole models)

`runners/` knows nothing of `search/`: it takes plain values and raises RunnerConfigError (bad input found
before any trial: the search layer turns it into a configuration error, exit 2) or ArchitectureError (a
sampled configuration that cannot be built: a pruned trial, not a crash).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

RUNNERS = ("scratch_cnn", "transfer")  # modules of runners/ a space's `model:` may name


class RunnerConfigError(ValueError):
    """Bad run-wide input a runner found before any trial: an unknown backbone, missing weights."""


class ArchitectureError(ValueError):
    """A sampled architecture that cannot be built for this input size (rejected before training)."""


@runtime_checkable
class Runner(Protocol):
    """What a module of runners/ named by a space's `model:` provides (modules satisfy it structurally)."""

    def narrow_choices(self, choices: dict[str, list], defaults: dict[str, Any], *, backbone: str | None,
                       weights: str | None) -> dict[str, tuple[list, Any]]:
        """Check run-wide options against the space's categorical choices; {param: (choices, default)} to
        replace (empty: nothing narrowed). Raises RunnerConfigError."""

    def train_and_evaluate(self, params: dict, data, *, epochs: int, patience: int, seed: int, recipes: dict,
                           callbacks: list | None = None, evaluate_test: bool = True, options: dict | None = None,
                           checkpoint=None):
        """Build, fit (validating every epoch, resuming from `checkpoint`), test once: a runners.train.TrialResult.

        `options`: "weights", "workdir", "data_dir", "architectures", "max_mflops" (reject bigger models),
        "initial_weights" (a saved model of the same configuration to start from), "budget_end" (Unix seconds
        the run's time budget ends, None without one: a runner may refuse a trial that cannot end in time)."""

    def measure_speed(self, params: dict, data, *, options: dict | None = None) -> dict:
        """A few timed training steps of this configuration (or, where trials train on cached features, of the
        embedding): {"images_per_second", "mflops_per_image", "train_gflops"} for the search to plan from."""

    def release(self, result=None) -> None:
        """Free a finished trial's model and graphs."""


def runner_named(model: str) -> ModuleType:
    """The runners/ module a space's `model:` names, checked against the Runner protocol."""
    if model not in RUNNERS:
        raise RunnerConfigError(f"unknown model '{model}' in the space; a model is a module of runners/ "
                                f"({', '.join(RUNNERS)})")
    module = importlib.import_module(f"runners.{model}")
    missing = [name for name in ("narrow_choices", "train_and_evaluate", "measure_speed", "release")
               if not hasattr(module, name)]
    if missing:  # a contributor's new runner, half written
        raise RunnerConfigError(f"runners/{model}.py lacks {', '.join(missing)} (see runners/protocol.py)")
    return module
