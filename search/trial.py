"""One trial, the same for every driver: open its MLflow run, train through the runner, record how it ended.

A driver (Optuna, Keras Tuner) decides what to train and fills a TrialPlan; `run_trial` does the rest:

    run_id = open_run(setup, parent, plan)        # a nested MLflow run with every parameter
    metrics = run_trial(setup, plan, run_id, on_end=..., ranking=...)

`run_trial` trains through the space's runner (runners/protocol.py), logs every epoch, and ends the run
COMPLETE (summary metrics, test evaluation unless the trial is a screen, the model kept when among the best K), PRUNED (rejected before
training, raised as TrialRejected, or stopped by the pruner), KILLED (Ctrl-C: the checkpoint stays for a
resume) or FAIL (any other error, re-raised so the driver counts it). `on_end(state, reason)` lets the
driver record the same end in its own store first.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search import tracking
from search.setup import RunSetup, dataset_at, runner_options

log = logging.getLogger("search")


class TrialRejected(Exception):
    """The runner refused the sampled configuration before training (an ArchitectureError): a pruned trial."""


@dataclass
class TrialPlan:
    """What a driver decided for one trial."""

    number: int
    params: dict
    seed: int
    epochs: int
    patience: int
    context: dict                                  # logged with the parameters (dataset, subset, epochs, ...)
    tags: dict                                     # the driver's tags for the trial's run
    progress: object                               # runners.callbacks.Progress: the console line per epoch
    callbacks: list = field(default_factory=list)  # the driver's own Keras callbacks (pruning, Keras Tuner's)
    checkpoint: Path | None = None                 # folder for the training state after every epoch
    deadline: float | None = None                  # Unix seconds: no epoch may end after it (a refit round)
    initial_weights: str | None = None             # a saved model of this configuration to start from
    resumed: bool = False                          # continues an earlier process's run (its datasets are logged)
    epochs_before: int = 0                         # epochs an earlier refit round trained, for budget_fraction
    first_epoch: int = 0                           # epochs trained before this trial started (a continued
                                                   # Hyperband trial): its epochs are logged after them
    train_fraction: float | None = None            # share of the training images per epoch (an explored trial's
                                                   # cheaper fidelity, search/plan.py); None = all
    epoch_work: float = 1.0                        # one epoch's work against one of the default's (a trial's
                                                   # forward MFLOP over the default's, fidelity.resource: cost)
    val_images: int | None = None                  # validation images per epoch (an explored trial's cheaper
                                                   # fidelity, search/plan.py); None = all
    tested: bool = True                            # answers the test split when complete; False: a screen (an
                                                   # explored trial of a run that refits, search/plan.py)


class EpochLog:
    """Logs every metric of an epoch to a trial's run in one call, with the epoch (from 1) as step."""

    def __init__(self, client, run_id: str, first_epoch: int = 0):
        self.client, self.run_id, self.first_epoch = client, run_id, first_epoch
        self.seconds = 0.0  # time spent logging, for the overhead benchmark

    def __call__(self, epoch: int, logs: dict) -> None:
        started = time.perf_counter()
        tracking.log_metrics(self.client, self.run_id, dict(logs or {}), step=self.first_epoch + epoch)
        self.seconds += time.perf_counter() - started


def open_run(setup: RunSetup, parent: str, plan: TrialPlan) -> str:
    """A new MLflow run for the trial, nested under this process's parent run."""
    return tracking.start_trial_run(setup.client, setup.experiment_id, parent, setup.study_name, plan.number,
                                    plan.params, plan.context, tags=plan.tags)


def run_trial(setup: RunSetup, plan: TrialPlan, run_id: str, *, on_end, ranking) -> tuple[dict, object]:
    """Train the plan through the runner and record it; (metrics, result) of a completed trial.

    `on_end(state, reason)` records a trial that did not complete in the driver's store; `ranking()` lists
    (val_accuracy, number) of the study's other completed trials, to decide whether this model is kept."""
    logger = EpochLog(setup.client, run_id, plan.first_epoch)
    monitor = tracking.start_system_metrics(run_id, setup.tracking_uri)  # CPU, memory, disk on the trial's run
    try:
        return train_and_record(setup, plan, run_id, logger, on_end, ranking)
    finally:
        tracking.stop_system_metrics(monitor)


def train_and_record(setup: RunSetup, plan: TrialPlan, run_id: str, logger: EpochLog, on_end,
                     ranking) -> tuple[dict, object]:
    """run_trial's body: train, and record how the trial ended."""
    import optuna

    from runners.callbacks import Deadline, EachEpoch
    from runners.datasets import with_split_subset
    from runners.protocol import ArchitectureError

    runner, client = setup.runner, setup.client
    try:
        data = dataset_at(setup, plan.params["image_size"])
        full_train = len(data.splits["train"][1])
        if plan.train_fraction:
            data = with_split_subset(data, "train", max(1, int(plan.train_fraction * full_train)))
        if plan.val_images:
            data = with_split_subset(data, "val", plan.val_images)
        if not plan.resumed:
            tracking.log_datasets(client, run_id, data)
        started = time.perf_counter()
        result = runner.train_and_evaluate(
            plan.params, data, epochs=plan.epochs, patience=plan.patience, seed=plan.seed,
            recipes=setup.space.recipes, evaluate_test=plan.tested,
            callbacks=([Deadline(plan.deadline)] if plan.deadline else []) + [EachEpoch(logger), plan.progress]
            + plan.callbacks,
            options={**runner_options(setup), "initial_weights": plan.initial_weights}, checkpoint=plan.checkpoint)
        trial_seconds = time.perf_counter() - started
    except ArchitectureError as err:
        runner.release()
        end(client, run_id, on_end, "PRUNED", str(err))
        log.info(f"trial {plan.number}: rejected before training: {err}")
        raise TrialRejected(str(err)) from None
    except optuna.TrialPruned:
        runner.release()
        history = plan.progress.val_history
        tracking.log_metrics(client, run_id, {"best_val_accuracy": max(history, default=None),
                                              "epochs_run": len(history),
                                              "budget_fraction": len(history) * plan.epoch_work / max(setup.epochs, 1)})
        end(client, run_id, on_end, "PRUNED", f"pruned after epoch {len(history)}")
        log.info(f"trial {plan.number}: pruned after epoch {len(history)}")
        raise
    except KeyboardInterrupt:
        # the checkpoint stays: the next invocation resumes this trial from its last finished epoch
        end(client, run_id, on_end, "KILLED", "interrupted (Ctrl-C); the next run resumes it")
        raise
    except Exception as err:
        runner.release()
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:500] if str(err) else ''}"
        end(client, run_id, on_end, "FAIL", reason)
        log.warning(f"trial {plan.number}: failed: {reason}")
        raise
    sizes = {"train_images": len(data.splits["train"][1]), "full_train_images": full_train,
             "val_images": len(data.splits["val"][1])}  # what the refit scales an explored trial's epochs by
    metrics = record_completed(setup, plan, run_id, result, trial_seconds, logger.seconds, data, ranking(), sizes)
    return metrics, result


def end(client, run_id: str, on_end, state: str, reason: str) -> None:
    """Record why a trial ended in the driver's store, then on its MLflow run."""
    on_end(state, reason)
    tracking.finish_trial_run(client, run_id, state, reason)


def trial_metrics(result, trial_seconds: float, logging_seconds: float) -> dict:
    """The summary metrics of a completed trial's run."""
    return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "best_val_accuracy": result.val_accuracy, "best_val_loss": result.val_loss,
            "best_val_top3_accuracy": result.val_top3_accuracy, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "epochs_resumed_from": result.resumed_from_epoch,
            "param_count": result.param_count,
            "train_seconds": result.fit_seconds, "trial_seconds": trial_seconds,
            "logging_seconds": logging_seconds, **result.test}


def record_completed(setup: RunSetup, plan: TrialPlan, run_id: str, result, trial_seconds: float,
                     logging_seconds: float, data, others: list[tuple[float, int]], sizes: dict) -> dict:
    """Log a completed trial's summary, keep its model if among the best K, log its test evaluation and close
    its run in the background (the confusion matrix takes ~0.4 s, drawn while the next trial starts)."""
    metrics = {**trial_metrics(result, trial_seconds, logging_seconds), **sizes,
               # of the full fidelity (max epochs of the default's work, all images); a refit's second round counts
               # the first round's too
               "budget_fraction": (result.epochs_run + plan.epochs_before) * plan.epoch_work / max(setup.epochs, 1)
               * sizes["train_images"] / max(sizes["full_train_images"], 1)}  # an explored trial's images too
    tracking.log_metrics(setup.client, run_id, metrics)
    tags = {**result.tags, **({} if plan.tested else {"search.test": "not tested: an explored trial (a screen) of "
                                                      "a run that refits; the refit's rounds are tested"})}
    if tags:
        tracking.set_tags(setup.client, run_id, tags)
    keep_model(setup, plan.number, result, others, plan.params)
    labels = data.splits["test"][1]
    setup.background.submit(close_completed_run, setup.client, run_id, labels, result.test_probabilities,
                            data.class_names)
    return metrics


def keep_model(setup: RunSetup, number: int, result, others: list[tuple[float, int]], params: dict) -> None:
    """Save this trial's model if it ranks among the study's best K (with its validation and test answers and
    parameters, when the runner gave them: an ensemble candidate); delete models that fell out."""
    folder = setup.models
    # ties go to the earlier trial, as the best trial does (max keeps the first of equals)
    ranked = sorted(others + [(result.val_accuracy, number)], key=lambda vn: (-vn[0], vn[1]))
    keep = {n for _, n in ranked[: setup.keep_models]}
    if number in keep:
        folder.mkdir(parents=True, exist_ok=True)
        result.model.save(folder / f"trial-{number}.keras")
        if result.val_probabilities is not None and result.test_probabilities is not None:  # ensemble candidate
            save_answers(folder, number, result.val_probabilities, result.test_probabilities, params,
                         int(result.model.input_shape[1]))
    for path in folder.glob("trial-*.*"):
        if int(path.name.split(".")[0].split("-")[1]) not in keep:
            path.unlink()


def save_answers(folder: Path, number: int, val, test, params: dict, size: int) -> None:
    """A kept model's answers on validation and test beside it: what makes it an ensemble candidate."""
    np.savez(folder / f"trial-{number}.predictions.npz", val=val, test=test,
             params=np.array(json.dumps(params, default=str)),
             size=np.array(size))  # members of one ensemble share an input


def test_screen(setup: RunSetup, number: int, run_id: str, params: dict) -> None:
    """Answer the test split with a screen's kept model after all (the study's best, when no refit round replaced
    it): its run gets the test metrics and evaluation a tested trial logs, its model the answers beside it."""
    from search.evaluation import log_evaluation

    path = setup.models / f"trial-{number}.keras"
    if (not path.is_file() or not hasattr(setup.runner, "evaluate_saved")
            or "test_accuracy" in setup.client.get_run(run_id).data.metrics):  # tested by an earlier invocation
        return
    data = dataset_at(setup, params["image_size"])
    metrics, test, val = setup.runner.evaluate_saved(path, params, data, options=runner_options(setup))
    tracking.log_metrics(setup.client, run_id, metrics)
    tracking.set_tags(setup.client, run_id, {"search.test": "tested after the search: the study's best"})
    log_evaluation(setup.client, run_id, data.splits["test"][1], test, data.class_names)
    save_answers(setup.models, number, val, test, params, params["image_size"])
    log.info(f"trial {number}: the best trial, a screen no refit replaced, tested now: test accuracy "
             f"{metrics['test_accuracy']:.4f}")


def close_completed_run(client, run_id: str, labels, probabilities, class_names: list[str]) -> None:
    """Log a completed trial's test evaluation artifacts, then end its run as COMPLETE."""
    from search.evaluation import log_evaluation

    try:
        if probabilities is not None:
            log_evaluation(client, run_id, labels, probabilities, class_names)
    finally:
        tracking.finish_trial_run(client, run_id, "COMPLETE")


def start_weights(setup: RunSetup, number: int, continues: int | None) -> str | None:
    """The kept model of trial `continues` to start from (a refit's second round, a continued Hyperband
    trial), or None: a fresh start."""
    if continues is None:
        return None
    path = setup.models / f"trial-{continues}.keras"
    if not path.is_file():  # fell out of the kept models (--keep-models): the trial trains from scratch
        log.warning(f"trial {number}: trial {continues}'s model is not kept; training from scratch")
        return None
    return str(path)
