"""Measure, then plan: what this machine does with the space's default, and whether exploring can pay.

Before the first trial of a time-budgeted run, `measure_machine` times the float32 matmul rate and a few training
steps of the space's default configuration in the precision the run uses (runners/speed.py), narrows that default to
a smaller `width` where it could not train REFIT_MIN_EPOCHS epochs in the refit's share (`fit_default_to_machine`),
and the parent run records them. `exploration_pays` asks whether one trial of the default at the first rung of the
fidelity (`min_epochs`), on the share of the images an explored trial trains on, fits MIN_EXPLORED_TRIALS times in
exploration's share of the budget; when they do not, exploring would spend its share on a trial or two that teach
the sampler nothing, so the run says so and trains the default for the whole budget.
`explored_fidelity` prices each explored trial when the space counts rungs in work (`fidelity.resource: cost`).
In a run that refits, explored trials are screens: they validate (on `fidelity.val_subset` of the validation
images) but answer no test split; the refit's rounds are the models, and they are tested (`screens_only`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

from search import space as spaces
from search import tracking
from search.config import (EXPLORED_TRIALS_WANTED, MIN_EXPLORED_TRIALS, REFIT_EPOCH_MARGIN, REFIT_MIN_EPOCHS,
                           TRAIN_SUBSET_FLOOR, VAL_SUBSET_FLOOR, VAL_SUBSET_RATIO)
from search.fidelity import TrialFidelity, explored_params, trial_fidelity
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
    setup_seconds: float         # tracing (as measured) and the evaluation, once per tested trial
    train_images: int = 0        # the run's training split
    val_images: int = 0          # the run's validation split
    evaluation_seconds: float = 0.0  # a tested trial's answers on test and validation (mirror views included)


def measure_machine(setup: RunSetup, precision: str) -> Speed:
    """Time the machine and the default configuration; print it and return it. Where the default cannot train
    REFIT_MIN_EPOCHS epochs in the refit's share of the budget, narrow it first (fit_default_to_machine)."""
    from runners.speed import matmul_gflops

    gflops = matmul_gflops()
    speed = default_speed(setup, gflops, precision)
    log.info(f"machine: {gflops:.0f} GFLOP/s float32 matmul; the space's default trains at "
             f"{speed.images_per_second:.0f} images/s ({speed.train_gflops:.1f} GFLOP/s, {speed.mflops_per_image:.0f} "
             f"MFLOP per image, {precision}): ~{speed.epoch_seconds:.0f} s per epoch of {speed.train_images:,} images")
    return fit_default_to_machine(setup, speed)


def default_speed(setup: RunSetup, gflops: float, precision: str) -> Speed:
    """What this machine does with the space's default configuration, from a few timed training steps."""
    default = spaces.default_params(setup.space)
    measured, sizes = measure(setup, default)
    rate = measured["images_per_second"]
    evaluation = evaluation_seconds(sizes, rate, default)
    return Speed(gflops, rate, measured["mflops_per_image"], measured["train_gflops"], precision,
                 epoch_seconds=epoch_seconds(sizes, rate),
                 setup_seconds=measured.get("trace_seconds", 0.0) + evaluation,
                 train_images=sizes["train"], val_images=sizes["val"], evaluation_seconds=evaluation)


def fit_default_to_machine(setup: RunSetup, speed: Speed) -> Speed:
    """The rule of `max_mflops: auto` applied to the default itself: a model whose refit cannot train
    REFIT_MIN_EPOCHS epochs in the refit's share of the budget stays far below what a cheaper one reaches there.
    Where the default cannot, this run's default (setup.space) takes the widest of the space's narrower `width`
    choices that can (each measured), else the narrowest; the speed returned is the kept default's. On a 2-core
    AVX2 CPU fast_cifar trained 6 epochs of 6,000 images in the README command's 10 minutes (65.1% test), at
    width 0.5 (249-266 against 100 images/s) 19-20 (72.75% and 73.45%)."""
    width = setup.space.params.get("width")
    seconds = setup.timeout * setup.refit
    if (width is None or width.type != "categorical" or "width" not in spaces.default_params(setup.space)
            or epochs_for(speed, seconds) >= REFIT_MIN_EPOCHS):
        return speed
    narrower = sorted((c for c in width.choices if c < width.default), reverse=True)
    given = speed
    for choice in narrower:
        setup.space = dataclasses.replace(setup.space, params={**setup.space.params,
                                                               "width": dataclasses.replace(width, default=choice)})
        speed = default_speed(setup, speed.matmul_gflops, speed.precision)
        if epochs_for(speed, seconds) >= REFIT_MIN_EPOCHS:
            break
    if narrower:
        log.info(f"default: at width {width.default} the space's default trains ~{epochs_for(given, seconds)} epochs "
                 f"in the refit's {seconds:.0f} s here, fewer than {REFIT_MIN_EPOCHS}; this run's default is width "
                 f"{setup.space.params['width'].default}: {speed.images_per_second:.0f} images/s, "
                 f"~{epochs_for(speed, seconds)} epochs ({speed.epoch_seconds:.0f} s each)")
    return speed


def measure(setup: RunSetup, params: dict) -> tuple[dict, dict]:
    """The runner's timed steps of a configuration on the run's data, and the data's split sizes."""
    data = dataset_at(setup, params.get("image_size", 32))
    return setup.runner.measure_speed(params, data, options=runner_options(setup)), data.sizes()


def forward_mflops(setup: RunSetup, params: dict) -> float | None:
    """A configuration's forward MFLOP per image, from the runner that builds it (`fidelity.resource: cost`);
    None when it cannot be built: the trial is then rejected the usual way, when it trains."""
    from runners.protocol import ArchitectureError

    data = dataset_at(setup, params.get("image_size", 32))
    try:
        return setup.runner.forward_mflops(params, data, options=runner_options(setup))
    except ArchitectureError:
        return None


def epoch_seconds(sizes: dict, images_per_second: float) -> float:
    """One epoch on every training image, validation included, REFIT_EPOCH_MARGIN slower than measured."""
    return (sizes["train"] + VALIDATION_COST * sizes["val"]) / images_per_second * REFIT_EPOCH_MARGIN


def evaluation_seconds(sizes: dict, images_per_second: float, params: dict) -> float:
    """A tested trial's answers on the test and validation splits (two views each with `test_time_flip`), from
    its training rate."""
    views = 2 if params.get("test_time_flip") else 1
    return VALIDATION_COST * views * (sizes["test"] + sizes["val"]) / images_per_second


def screens_only(setup) -> bool:
    """Whether explored trials skip the test split: in a run that refits, unless a constraint needs their
    inference time (--max-inference-ms) or the runner cannot test a saved model later (`evaluate_saved`, for a
    best trial the refit did not replace)."""
    return bool(setup.refit) and setup.config.max_inference_ms is None and hasattr(setup.runner, "evaluate_saved")


def explored_overhead(setup, speed: Speed) -> float:
    """What an explored trial pays besides its epochs: tracing, and the evaluation unless it is a screen."""
    return speed.setup_seconds - (speed.evaluation_seconds if screens_only(setup) else 0.0)


def metrics_of(speed: Speed) -> dict:
    """The measurement as parent-run metrics (the precision goes in a tag)."""
    return {f"machine_{k}": v for k, v in asdict(speed).items() if k != "precision"}


def exploration_pays(setup: RunSetup, speed: Speed, explore_seconds: float) -> tuple[bool, float]:
    """(whether MIN_EXPLORED_TRIALS trials of the default at the first rung, on the images an explored trial trains
    and validates on, fit in exploration's share, one such trial's seconds)."""
    first_rung = setup.space.fidelity.get("min_epochs", 1)
    epoch = explored_epoch_seconds(setup, speed, exploration_fraction(setup, speed, explore_seconds))
    seconds = explored_overhead(setup, speed) + first_rung * epoch
    return MIN_EXPLORED_TRIALS * seconds <= explore_seconds, seconds


def explored_epoch_seconds(setup, speed: Speed, fraction: float | None) -> float:
    """One epoch of the default as an explored trial trains it: on `fraction` of the training images, validating
    on `fidelity.val_subset` of the validation images (a full epoch when the split sizes are unknown)."""
    if not speed.train_images:
        return speed.epoch_seconds
    val_images = explored_val_images(setup, speed, fraction) or speed.val_images
    sizes = {"train": speed.train_images * (fraction or 1.0), "val": val_images}
    return epoch_seconds(sizes, speed.images_per_second)


def plan_exploration(setup, parent: str, explore: float | None) -> None:
    """Settle and say how explored trials train (the Optuna driver's `setup`): their share of the training images,
    the derived `max_mflops`, their validation images, whether they are screens, their image size and width."""
    setup.explore_fraction = exploration_fraction(setup, setup.speed, explore)
    if explore and setup.speed and setup.space.budget.get("max_mflops") == "auto":
        setup.derived_max_mflops = derived_max_mflops(setup, setup.speed, setup.timeout * setup.refit, explore,
                                                      setup.explore_fraction)
        log.info(f"max_mflops: {setup.derived_max_mflops:,.0f} MFLOP per image (auto: what a first-rung trial can "
                 f"afford of exploration's {explore:.0f} s and a refit of {REFIT_MIN_EPOCHS} epochs of the rest)")
        tracking.log_metrics(setup.client, parent, {"max_mflops": setup.derived_max_mflops})
    if setup.explore_fraction:
        share = f", so that more of them fit in its {explore:.0f} s" if explore else ""
        log.info(f"exploration: explored trials train on {setup.explore_fraction:.0%} of the training images per "
                 f"epoch (the space's fidelity.train_subset){share}; a refit trains on all of them")
    setup.explore_val_images = explored_val_images(setup, setup.speed, setup.explore_fraction)
    if setup.explore_val_images:
        log.info(f"exploration: explored trials validate on {setup.explore_val_images:,} of the "
                 f"{setup.speed.val_images:,} validation images (the space's fidelity.val_subset); a refit on all")
    if screens_only(setup):
        log.info("exploration: explored trials are screens (validation only); the refit's rounds answer the test split")
    cheaper = [f"{share:.0%} of the {key.replace('_', ' ')}" for key, share in setup.space.fidelity.items()
               if key in ("image_size", "width") and share < 1]
    if cheaper:
        log.info(f"exploration: explored trials train at {' and '.join(cheaper)}; the refit at full size and width"
                 if setup.refit else "fidelity.image_size and width apply to a run that refits (a time budget): "
                 "every trial of this one trains at full size and width")


def exploration_fraction(setup: RunSetup, speed: Speed | None, explore_seconds: float | None) -> float | None:
    """The share of the training images an explored trial trains on per epoch (None: all of them), from the space's
    `fidelity.train_subset`: a fraction, or `auto`: as many as let EXPLORED_TRIALS_WANTED first-rung trials of
    the default fit in exploration's share (never below TRAIN_SUBSET_FLOOR). Validation stays whole, so every trial
    is compared on the same photos; the refit trains on every image."""
    wanted = setup.space.fidelity.get("train_subset", 1.0)
    if wanted != "auto":
        return None if wanted >= 1 else float(wanted)
    if not speed or not explore_seconds or not speed.train_images:
        return None
    per_trial = explore_seconds / EXPLORED_TRIALS_WANTED - explored_overhead(setup, speed)
    per_epoch = per_trial / setup.space.fidelity.get("min_epochs", 1) / REFIT_EPOCH_MARGIN
    images = per_epoch * speed.images_per_second - VALIDATION_COST * speed.val_images
    fraction = max(images / speed.train_images, TRAIN_SUBSET_FLOOR)
    return None if fraction >= 1 else fraction


def explored_val_images(setup, speed: Speed | None, fraction: float | None) -> int | None:
    """How many validation images an explored trial of a run that refits validates on per epoch (None: all), from
    the space's `fidelity.val_subset`: a fraction, or `auto`: VAL_SUBSET_RATIO of the images it trains on per epoch,
    at least VAL_SUBSET_FLOOR. Every explored trial gets the same ones; the refit validates on them all."""
    wanted = setup.space.fidelity.get("val_subset", 1.0)
    if not setup.refit or not speed or not speed.val_images or wanted == 1:
        return None
    if wanted == "auto":
        images = max(VAL_SUBSET_FLOOR, int(VAL_SUBSET_RATIO * speed.train_images * (fraction or 1.0)))
    else:
        images = max(1, int(wanted * speed.val_images))
    return images if images < speed.val_images else None


def measured_refit_seconds(setup: RunSetup, params: dict) -> tuple[float, float]:
    """(one epoch on every training image, the evaluation) of a configuration, planned from a few timed training
    steps of it: for a refit of a trial explored on part of the images, or not tested."""
    measured, sizes = measure(setup, params)
    rate = measured["images_per_second"]
    return epoch_seconds(sizes, rate), evaluation_seconds(sizes, rate, params)


def full_epoch_seconds(trial_epoch_seconds: float, train_images: int, full_images: int, val_images: int) -> float:
    """What an epoch of a trial timed on `train_images` costs on all `full_images` (validation alike in both)."""
    return trial_epoch_seconds * (full_images + VALIDATION_COST * val_images) / (train_images
                                                                                + VALIDATION_COST * val_images)


def derived_max_mflops(setup: RunSetup, speed: Speed, refit_seconds: float, explore_seconds: float,
                       fraction: float | None) -> float:
    """`max_mflops: auto`: the largest forward cost per image (training time grows with it, priced from the
    default's measured epoch) that both lets a refit train REFIT_MIN_EPOCHS epochs on every image in the refit's
    seconds and lets an explored trial's first rung (on its share of the images) take no more than exploration's
    share over EXPLORED_TRIALS_WANTED; never below the default's own cost, so the default is always allowed."""
    refit_epoch = refit_seconds / REFIT_MIN_EPOCHS
    first_rung = setup.space.fidelity.get("min_epochs", 1) * speed.epoch_seconds * (fraction or 1.0)
    trial = explore_seconds / EXPLORED_TRIALS_WANTED - explored_overhead(setup, speed)
    ratio = min(refit_epoch / speed.epoch_seconds, trial / first_rung)
    return speed.mflops_per_image * max(1.0, ratio)


def epochs_for(speed: Speed, seconds: float) -> int:
    """Epochs of the default that fill `seconds` (at least one)."""
    return max(1, int((seconds - speed.setup_seconds) // speed.epoch_seconds))  # the default's refit is tested


def at_exploration_fidelity(setup, params: dict) -> dict:
    """A configuration as an explored trial trains it: smaller and narrower (`fidelity.image_size`, `width`) in a
    run that refits, which then trains the configuration as suggested; as suggested in a run without a refit."""
    return explored_params(params, setup.space.fidelity) if setup.refit else params


def explored_fidelity(setup, params: dict, epochs: int) -> TrialFidelity:
    """An explored trial's epochs and pruning steps: with `fidelity.resource: cost`, the work of `epochs` epochs of
    the space's default (search/fidelity.py), priced from both models' forward MFLOP per image. `setup` is the
    Optuna driver's (it caches the default's price in `default_mflops` and knows whether the run refits)."""
    resource = setup.space.fidelity.get("resource", "epochs")
    if resource != "cost":
        return TrialFidelity(epochs)
    if setup.default_mflops is None:  # the default at the same fidelity as the trial
        setup.default_mflops = forward_mflops(setup, at_exploration_fidelity(setup, spaces.default_params(setup.space)))
    mflops = forward_mflops(setup, params)
    fidelity = trial_fidelity(resource, epochs, mflops, setup.default_mflops)
    if fidelity.steps_per_epoch:
        log.info(f"{mflops:,.0f} MFLOP per image, {mflops / setup.default_mflops:.2f}x the default's: "
                 f"{fidelity.epochs} epochs for the work of the default's {epochs}")
    return fidelity
