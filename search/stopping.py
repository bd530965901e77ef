"""Stop a study when it stops paying: no gain of `min_improvement` over the last N trials or M minutes.

(`patience` alone is Keras early stopping inside a trial; this is the study-level `--study-patience`.)
"""
from __future__ import annotations

import datetime as dt

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
        values = [t.value for t in complete]
        if self.trials and len(values) > self.trials and not self.improved(values[: -self.trials], values):
            self.stop(study, "trials", max(values), f"no gain of {self.min_improvement:g} in the last "
                                                     f"{self.trials} completed trials")
        elif self.minutes and complete:
            edge = dt.datetime.now() - dt.timedelta(minutes=self.minutes)
            before = [t.value for t in complete if t.datetime_complete < edge]
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
