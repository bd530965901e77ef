"""What Hyperband's rungs count (the space's `fidelity.resource`): epochs, or the work a trial has done.

`resource: epochs`: every explored trial trains `budget.epochs` and reports its validation accuracy after each
epoch at step epoch - 1 (Optuna's Keras callback); rungs come every `reduction_factor`-fold more epochs.

`resource: cost`: a step is a tenth (COST_STEPS_PER_EPOCH) of the work of one epoch of the space's default on the
same images, work being training images x forward MFLOP per image. Every explored trial gets the work of
`budget.epochs` epochs of the default: a model a third as costly trains three times the epochs (at most
COST_MAX_EPOCHS_FACTOR times), one twice as costly half of them, and each rung compares trials after the same
work, not after the same number of epochs. The refit is not pruned and plans its epochs from time.

Two more fidelities make an explored trial cheaper in a run that refits (`explored_params`): `fidelity.image_size`
(a share of the side) and `fidelity.width` (a share of every block's filters); the refit trains the configuration
as suggested, at full size and width. With resource cost, the unit is then the default at the same fidelity.
"""
from __future__ import annotations

from dataclasses import dataclass

from search.config import COST_MAX_EPOCHS_FACTOR, COST_STEPS_PER_EPOCH

RESOURCES = ("epochs", "cost")
MIN_EXPLORED_SIDE = 16  # pixels: below this most layouts pool their feature maps away


@dataclass(frozen=True)
class TrialFidelity:
    """How many epochs one explored trial trains, and the pruning step each of its epochs ends at."""

    epochs: int
    steps_per_epoch: float | None = None  # resource cost: the steps one epoch of this trial adds; None: epochs

    @property
    def epoch_work(self) -> float:
        """One epoch's work against one epoch of the default's (1 with resource epochs)."""
        return 1.0 if self.steps_per_epoch is None else self.steps_per_epoch / COST_STEPS_PER_EPOCH

    def step(self, epoch: int) -> int:
        """The step the trial reports after its epoch `epoch` (counted from 0, as Keras does)."""
        if self.steps_per_epoch is None:
            return epoch
        # at least one step per epoch, so each epoch reports at a new step (a model under a tenth of the
        # default's cost would otherwise report twice at one step, which Optuna ignores)
        return max(epoch + 1, round((epoch + 1) * self.steps_per_epoch))


def steps(resource: str, epochs: int) -> int:
    """`epochs` (of the default, with resource cost) in the resource's pruning steps."""
    return epochs * COST_STEPS_PER_EPOCH if resource == "cost" else epochs


def rung_range(resource: str, epochs: int, min_epochs: int) -> tuple[int, int]:
    """The pruner's (min_resource, max_resource), in the resource's steps."""
    return steps(resource, min_epochs), steps(resource, max(epochs, min_epochs))


def trial_fidelity(resource: str, epochs: int, mflops: float | None = None,
                   default_mflops: float | None = None) -> TrialFidelity:
    """An explored trial's epochs and steps: with resource cost, the work of `epochs` epochs of the default."""
    if resource != "cost" or not mflops or not default_mflops:
        return TrialFidelity(epochs)
    ratio = mflops / default_mflops  # the trial's work per epoch against the default's, on the same images
    trained = min(max(1, round(epochs / ratio)), epochs * COST_MAX_EPOCHS_FACTOR)
    return TrialFidelity(trained, COST_STEPS_PER_EPOCH * ratio)


def explored_params(params: dict, fidelity: dict) -> dict:
    """A configuration at exploration's cheaper fidelity: `fidelity.image_size` x the side (a multiple of 8 px, at
    least MIN_EXPLORED_SIDE) and `fidelity.width` x the width; unchanged when the space gives neither."""
    size_share, width_share = fidelity.get("image_size", 1.0), fidelity.get("width", 1.0)
    cheaper = dict(params)
    if size_share < 1 and "image_size" in params:
        cheaper["image_size"] = max(MIN_EXPLORED_SIDE, round(params["image_size"] * size_share / 8) * 8)
    if width_share < 1:
        cheaper["width"] = params.get("width", 1.0) * width_share
    return cheaper


def pruning_callback(trial, fidelity: TrialFidelity, monitor: str = "val_accuracy"):
    """Optuna's Keras pruning callback, reporting at the fidelity's steps instead of at epoch numbers."""
    from optuna_integration import KerasPruningCallback

    class AtFidelitySteps(KerasPruningCallback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            super().on_epoch_end(fidelity.step(epoch), logs)

    return AtFidelitySteps(trial, monitor)
