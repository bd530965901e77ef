"""Stop a study's process when it stops paying, or when it has grown too big to keep going.

`FailureStreak`: too many failed trials in a row (`--max-failures`).
`StudyPatience`: no gain of `min_improvement` over the last N trials or M minutes (`patience` alone is
Keras early stopping inside a trial; this is the study-level `--study-patience`).
`MemoryWatch`: TensorFlow keeps ~10 MB per trained model after clear_session (measured: 20 rounds of
build, fit, clear_session grow the process by ~200 MB), so a worker that has grown by `--max-memory-growth`
(measured after a full garbage collection) since its first trial ends its loop and `search.run` starts it
afresh; the study resumes where it was.
"""
from __future__ import annotations

import datetime as dt
import gc

import optuna
from optuna.trial import TrialState


class StudyPatience:
    """An Optuna callback that stops the study and remembers why."""

    def __init__(self, trials: int | None = None, min_improvement: float = 0.0, minutes: float | None = None):
        self.trials, self.min_improvement, self.minutes = trials, min_improvement, minutes
        self.reason: str | None = None
        self.figures: dict = {}

    def improved(self, before: list[float], now: list[float]) -> bool:
        """True when the best of `now` beats the best of `before` by the required margin."""
        gain = max(now) - max(before)
        return gain >= self.min_improvement if self.min_improvement > 0 else gain > 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                          key=lambda t: t.datetime_complete)
        values = [t.values[0] for t in complete]
        if self.trials and len(values) > self.trials and not self.improved(values[: -self.trials], values):
            self.stop(study, "trials", max(values), f"no gain of {self.min_improvement:g} in the last "
                                                     f"{self.trials} completed trials")
        elif self.minutes and complete:
            edge = dt.datetime.now() - dt.timedelta(minutes=self.minutes)
            before = [t.values[0] for t in complete if t.datetime_complete < edge]
            started = min(t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start)
            if before and started < edge and not self.improved(before, values):
                self.stop(study, "minutes", max(values), f"no gain of {self.min_improvement:g} in the last "
                                                          f"{self.minutes:g} minutes")

    def stop(self, study: optuna.Study, kind: str, best: float, why: str) -> None:
        """Record the reason and the figures that triggered it, then stop the study."""
        self.reason = f"study patience: best val_accuracy {best:.4f}, {why}"
        self.figures = {"search.stopped_by": kind, "search.stopped_best": f"{best:.4f}",
                        "search.stopped_min_improvement": self.min_improvement,
                        "search.stopped_window": self.trials if kind == "trials" else f"{self.minutes} min"}
        study.stop()


def resident_mb() -> float:
    """This process's resident memory in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


class MemoryWatch:
    """An Optuna callback that stops this process's loop once it has grown by `limit_mb` since its first trial."""

    def __init__(self, limit_mb: float):
        self.limit_mb, self.baseline, self.reason = limit_mb, None, None
        self.figures: dict = {}

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # A pruned or failed trial's exception holds its frames (its arrays: ~190 MB of features for a head on two
        # backbones) in a reference cycle with Optuna's frame that caught it; only a full collection frees them
        gc.collect()
        now = resident_mb()
        if self.baseline is None:
            self.baseline = now
            return
        if now - self.baseline > self.limit_mb:
            self.reason = (f"memory grew by {now - self.baseline:.0f} MB since the first trial "
                           f"(limit --max-memory-growth {self.limit_mb:g} MB); restarting the worker")
            self.figures = {"search.memory_baseline_mb": f"{self.baseline:.0f}",
                            "search.memory_now_mb": f"{now:.0f}"}
            study.stop()


class FailureStreak:
    """Stops a study after `limit` failed trials in a row, remembering the last reason (both drivers).

    `note(state, reason)` takes one ended trial; as an Optuna callback it reads the trial and stops the study."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.tripped, self.last_reason = limit, 0, False, ""

    def note(self, state: str, reason: str | None) -> bool:
        """Count one ended trial (COMPLETE, PRUNED or FAIL); True once the limit is reached."""
        if state != "FAIL":
            self.streak = 0
            return False
        self.streak += 1
        self.last_reason = reason or "unknown"
        self.tripped = self.tripped or self.streak >= self.limit
        return self.tripped

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("surplus"):
            return  # a trial claimed past the target by a race between workers says nothing of the search
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            return
        if self.note(trial.state.name, trial.user_attrs.get("fail_reason")):
            study.stop()
