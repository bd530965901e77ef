"""Trials that outlive their process: checkpoints, take-over of a dead or interrupted trial, crash recovery.

A running trial keeps its training state after every epoch in `<workdir>/checkpoints/<study>/trial-N/` with
`trial.json` (its MLflow run, parameters, seed). A trial whose process died (or was stopped by Ctrl-C) is
continued by a new trial with the same parameters that takes that folder over (Optuna cannot hand a trial to
another process), and its MLflow run goes on; an ended trial's folder is removed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search import tracking
from search.setup import RunSetup

log = logging.getLogger("search")


def retried_trial(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of the trial a heartbeat retry re-runs (the last dead attempt), or None for other trials."""
    history = study._storage.get_trial_system_attrs(trial._trial_id).get("retry_history")
    return history[-1] if history else None


def close_retried_run(client, trial: optuna.Trial) -> None:
    """A retry that starts afresh (no checkpoint to take over) fails the dead attempt's MLflow run.

    A heartbeat retry starts with a copy of the dead attempt's user attrs, its run id among them."""
    stale_run = trial.user_attrs.get("mlflow_run_id")
    if stale_run and client.get_run(stale_run).info.status == "RUNNING":
        tracking.finish_trial_run(client, stale_run, "FAIL",
                                  f"its worker stopped sending heartbeats; retried as trial {trial.number}")


TRIAL_FILE = "trial.json"


def checkpoint_dir(checkpoints: Path, number: int) -> Path:
    """One trial's checkpoint folder: its training state (runners.callbacks.EpochCheckpoint) and trial.json."""
    return checkpoints / f"trial-{number}"


def write_trial_file(folder: Path, study: str, number: int, run_id: str, params: dict, seed: int) -> None:
    """What a taking-over trial needs besides the training state: the run to continue, parameters, seed."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"study": study, "trial": number, "mlflow_run_id": run_id, "params": params, "seed": seed},
                      default=str)
    (folder / f"{TRIAL_FILE}.tmp").write_text(text)
    os.replace(folder / f"{TRIAL_FILE}.tmp", folder / TRIAL_FILE)


def claim_checkpoint(checkpoints: Path, old: int, new: int) -> bool:
    """Move a dead trial's checkpoint folder to the trial that takes it over; False if it has none.

    The rename is atomic: when two processes try to take the same trial over, one of them gets it."""
    try:
        os.rename(checkpoint_dir(checkpoints, old), checkpoint_dir(checkpoints, new))
    except FileNotFoundError:
        return False
    return True


def take_over_checkpoint(setup: RunSetup, trial: optuna.Trial, retry_of: int | None) -> dict | None:
    """For a trial that continues a dead one: the dead trial's trial.json and the epochs it finished; else None.

    A trial enqueued by recover_stale_trials already holds the folder; a heartbeat retry claims it here.
    A dead trial whose runner kept no state but logged epochs (a fine-tuning transfer trial) cannot be
    continued without logging epochs twice: such a trial restarts, in a new run."""
    checkpoints, client = setup.checkpoints, setup.client
    folder = checkpoint_dir(checkpoints, trial.number)
    if retry_of is not None and not folder.is_dir():
        claim_checkpoint(checkpoints, retry_of, trial.number)
    if not (folder / TRIAL_FILE).is_file():
        return None
    from runners.callbacks import checkpoint_state

    found = json.loads((folder / TRIAL_FILE).read_text())
    state = checkpoint_state(folder)
    found["epoch"] = state["epoch"] if state else 0
    if not state and client.get_run(found["mlflow_run_id"]).data.metrics:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return found


def discard_checkpoint(checkpoints: Path | None, number: int) -> None:
    """Remove a trial's checkpoint folder (the trial ended, or will never be continued)."""
    if checkpoints is not None:
        shutil.rmtree(checkpoint_dir(checkpoints, number), ignore_errors=True)


class DiscardCheckpoint:
    """An Optuna callback: a trial's checkpoint goes once its end is recorded (Ctrl-C never gets here)."""

    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        discard_checkpoint(self.checkpoints, trial.number)


def enqueue_takeover(study: optuna.Study, dead: optuna.trial.FrozenTrial, checkpoints: Path) -> int | None:
    """Queue a trial with a dead trial's parameters and hand it the checkpoint; its number, or None.

    None when the dead trial left no checkpoint folder (or another process took it over first)."""
    if not (checkpoint_dir(checkpoints, dead.number) / TRIAL_FILE).is_file():
        return None
    carried = {k: dead.user_attrs[k] for k in ("refit_of", "epochs") if k in dead.user_attrs}  # a refit stays one
    study.enqueue_trial(dead.params, user_attrs={"source": f"resume:{dead.number}", "resumes": dead.number, **carried})
    queued = max((t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.user_attrs.get("resumes") == dead.number), key=lambda t: t.number)
    if claim_checkpoint(checkpoints, dead.number, queued.number):
        return queued.number
    # another process took it over between our look and our rename: this copy must never run
    study._storage.set_trial_user_attr(queued._trial_id, "fail_reason", f"trial {dead.number} was resumed elsewhere")
    study._storage.set_trial_state_values(queued._trial_id, state=TrialState.FAIL)
    return None


def recover_stale_trials(study: optuna.Study, client, exp_id: str, checkpoints: Path | None = None,
                         resume: bool = False) -> None:
    """After a crash: Optuna trials left RUNNING by a dead process on this host become FAIL, and open MLflow runs close.

    With `resume` (the study still needs trials), such a trial and one stopped by Ctrl-C are continued from
    their checkpoints: a new trial with the same parameters is queued and takes the checkpoint over (Optuna
    cannot hand a trial to another process). With a heartbeat storage (a database server) Optuna's retry
    queues it instead, as its heartbeat would after the grace period, and the retry takes the checkpoint
    over when it starts; failed trials whose worker vanished elsewhere get their run closed."""
    host = socket.gethostname()
    storage = study._storage
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if died_here(t, host):
            resumed_as = enqueue_takeover(study, t, checkpoints) if resume and checkpoints and not retry else None
            reason = "its process ended during the trial"
            if resumed_as is not None:
                reason += f"; resumed as trial {resumed_as}"
                storage.set_trial_user_attr(t._trial_id, "resumed_as", resumed_as)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            log.info(f"trial {t.number} was left running by a process that ended; marked failed"
                     + (f", resumed as trial {resumed_as}" if resumed_as is not None else ""))
            if retry:
                retry(study, storage.get_trial(t._trial_id))
            elif resumed_as is None:
                discard_checkpoint(checkpoints, t.number)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if checkpoints and t.user_attrs.get("interrupted") and checkpoint_dir(checkpoints, t.number).is_dir():
            resumed_as = enqueue_takeover(study, t, checkpoints) if resume else None
            if resumed_as is None:
                discard_checkpoint(checkpoints, t.number)
            else:
                log.info(f"trial {t.number} was interrupted; resumed as trial {resumed_as}")
    tracking.close_orphans(client, exp_id, live=set())
    still_open = {run.info.run_id for run in tracking.open_runs(client, exp_id)}
    # a resumed trial's run is shared with the failed trial it continues
    still_open -= {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id in still_open:
            still_open.discard(run_id)  # a retry that never ran carries its original's run id too
            tracking.finish_trial_run(client, run_id, "FAIL", "its worker stopped during the trial")


def died_here(trial: optuna.trial.FrozenTrial, host: str) -> bool:
    """True for a trial run by a process of this host that no longer exists."""
    return trial.user_attrs.get("host") == host and not tracking.pid_alive(str(trial.user_attrs.get("pid")))
