"""Measure, then plan: what this machine does with the space's default, and whether exploring can pay.

Before the first trial of a time-budgeted run, `measure_machine` times the float32 matmul rate and a few
training steps of the space's default configuration in the precision the run uses (runners/speed.py), and
the parent run records them. `exploration_pays` asks whether one trial of the default at the first rung of
the fidelity (`min_epochs`) fits in exploration's share of the budget; when it does not, exploring would
spend the budget on one truncated trial, so the run says so and trains the default for the whole budget.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from search import space as spaces
from search.config import REFIT_EPOCH_MARGIN
from search.setup import RunSetup, dataset_at, runner_options

log = logging.getLogger("search")
VALIDATION_COST = 1 / 3  # a validation or test image costs a forward pass, a third of a training step's work


@dataclass
class Speed:
    """What the machine does with the space's default configuration."""

    matmul_gflops: float
    images_per_second: float     # training (or, for cached-feature runners, embedding) rate of the default
    mflops_per_image: float      # forward pass of the default
    train_gflops: float
    precision: str
    epoch_seconds: float         # one epoch of the default on the run's data, validation included
    setup_seconds: float         # tracing (as measured) and the test pass, once per trial


def measure_machine(setup: RunSetup, precision: str) -> Speed:
    """Time the machine and the default configuration; print it and return it."""
    from runners.speed import matmul_gflops

    params = spaces.default_params(setup.space)
    data = dataset_at(setup, params.get("image_size", 32))
    measured = setup.runner.measure_speed(params, data, options=runner_options(setup))
    sizes = data.sizes()
    rate = measured["images_per_second"]
    epoch = (sizes["train"] + VALIDATION_COST * sizes["val"]) / rate * REFIT_EPOCH_MARGIN
    speed = Speed(matmul_gflops(), rate, measured["mflops_per_image"], measured["train_gflops"], precision,
                  epoch_seconds=epoch,
                  setup_seconds=measured.get("trace_seconds", 0.0) + VALIDATION_COST * sizes["test"] / rate)
    log.info(f"machine: {speed.matmul_gflops:.0f} GFLOP/s float32 matmul; the space's default trains at "
             f"{rate:.0f} images/s ({speed.train_gflops:.1f} GFLOP/s, {speed.mflops_per_image:.0f} MFLOP per image, "
             f"{precision}): ~{epoch:.0f} s per epoch of {sizes['train']:,} images")
    return speed


def metrics_of(speed: Speed) -> dict:
    """The measurement as parent-run metrics (the precision goes in a tag)."""
    return {f"machine_{k}": v for k, v in asdict(speed).items() if k != "precision"}


def exploration_pays(setup: RunSetup, speed: Speed, explore_seconds: float) -> tuple[bool, float]:
    """(whether one trial of the default at the first rung fits in exploration's share, that trial's seconds)."""
    first_rung = setup.space.fidelity.get("min_epochs", 1)
    seconds = speed.setup_seconds + first_rung * speed.epoch_seconds
    return seconds <= explore_seconds, seconds


def epochs_for(speed: Speed, seconds: float) -> int:
    """Epochs of the default that fill `seconds` (at least one)."""
    return max(1, int((seconds - speed.setup_seconds) // speed.epoch_seconds))
