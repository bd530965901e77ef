"""Tables for people: a leaderboard in Markdown, CSV, HTML or LaTeX, the Pareto front, parameter importances.

Shared by the leaderboard command (search.results) and the study report (search.report)."""
from __future__ import annotations

import pandas as pd

from search.errors import ConfigError

FORMATS = ("md", "csv", "html", "latex")


def to_text(table: pd.DataFrame, fmt: str) -> str:
    """The table as Markdown, CSV, HTML or LaTeX."""
    shown = table.drop(columns=["run_id"], errors="ignore")
    if fmt == "md":
        return shown.to_markdown(index=False, floatfmt=".4g")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "html":
        return shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
    if fmt == "latex":
        return shown.to_latex(index=False, float_format="%.4g", na_rep="")
    raise ConfigError(f"unknown format '{fmt}'; available: {', '.join(FORMATS)}")


def side_by_side(table: pd.DataFrame) -> pd.DataFrame:
    """A cross-study leaderboard: study, dataset and the cost columns first, then the parameters."""
    first = ["rank", "study", "dataset", "model", "trial", "state", "val_accuracy", "test_accuracy", "test_top3",
             "train_seconds", "inference_ms", "params"]
    present = [c for c in first if c in table.columns]
    return table[present + [c for c in table.columns if c not in present]]


PARETO_COSTS = ("train_seconds", "inference_ms", "params")


def pareto_front(table: pd.DataFrame, costs: tuple[str, ...] = PARETO_COSTS) -> pd.DataFrame:
    """Completed trials no other trial beats on validation accuracy and every cost at once, most accurate first.

    If the front holds more than the most accurate trial, measuring time or size would have offered a
    cheaper model for some accuracy: the seed studies' question."""
    import numpy as np

    columns = ["val_accuracy", *[c for c in costs if c in table.columns]]
    done = table[(table["state"] == "COMPLETE")].dropna(subset=columns)
    # accuracy is maximised, costs minimised: flip accuracy so that every column is "lower is better"
    values = done[columns].to_numpy(dtype=float) * np.array([-1.0] + [1.0] * (len(columns) - 1))
    better_or_equal = (values[:, None, :] <= values[None, :, :]).all(axis=2)
    strictly_better = (values[:, None, :] < values[None, :, :]).any(axis=2)
    dominated = (better_or_equal & strictly_better).any(axis=0)
    front = done[~dominated].sort_values("val_accuracy", ascending=False)
    return side_by_side(front).reset_index(drop=True)


def importances(study, evaluator=None) -> pd.DataFrame:
    """Optuna's parameter importances (fANOVA unless told) for a study's completed trials; empty when too few."""
    import optuna

    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=evaluator or optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=None if len(study.directions) == 1 else (lambda t: t.values[0]))
    except (RuntimeError, ValueError):  # fewer than two completed trials, or no parameter that varied
        found = {}
    return pd.DataFrame({"param": list(found), "importance": list(found.values())})
