"""`python -m search.results`: the leaderboard of a study, read back from MLflow with pandas.

    python -m search.results --study scratch_cnn-cifar10 --format md --top 10
    python -m search.results --study scratch_cnn-cifar10 --format csv --out leaderboard.csv

One row per trial, best first: completed trials by validation accuracy (model selection never looks at
test accuracy), then pruned, then failed ones (`--complete-only` leaves those out). Every trial run in
MLflow carries its params, metrics and state, so the table needs nothing else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from search.config import tracking_uri as resolve_tracking_uri
from search.errors import ConfigError

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "KILLED": 3, "RUNNING": 4}
METRICS = {"best_val_accuracy": "val_accuracy", "test_accuracy": "test_accuracy",
           "test_top3_accuracy": "test_top3", "best_val_loss": "val_loss", "train_seconds": "train_seconds",
           "inference_ms": "inference_ms", "param_count": "params", "epochs_run": "epochs"}
CONTEXT = ["dataset", "subset", "epochs_max", "patience", "seed", "model"]
FORMATS = ("md", "csv", "html", "latex")


def trial_runs(studies: list[str], tracking_uri: str | None = None, workdir: str = "mlruns") -> pd.DataFrame:
    """Every trial run of the studies, as MLflow's search_runs table."""
    import mlflow

    from search.tracking import connect

    client = connect(resolve_tracking_uri(tracking_uri, workdir))
    experiments = []
    for name in studies:
        found = client.get_experiment_by_name(name)
        if found is None:
            known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
            raise ConfigError(f"no study named '{name}' in MLflow store {client.tracking_uri}. "
                              f"Known studies: {', '.join(known) or 'none'}.")
        experiments.append(found.experiment_id)
    from search.tracking import fluent_api

    with fluent_api(client.tracking_uri):
        return mlflow.search_runs(experiment_ids=experiments, filter_string="tags.`search.role` = 'trial'",
                                  output_format="pandas", max_results=100_000)


def leaderboard(studies: list[str], tracking_uri: str | None = None, workdir: str = "mlruns",
                complete_only: bool = False) -> pd.DataFrame:
    """One row per trial, best first, with parameters as columns and the cost of each model."""
    runs = trial_runs(studies, tracking_uri, workdir)
    if runs.empty:
        return pd.DataFrame(columns=["study", "trial", "state", *METRICS.values()])
    table = pd.DataFrame({
        "study": runs["tags.optuna.study"],
        "trial": runs["tags.optuna.trial_number"].astype(int),
        "state": runs["tags.search.state"].fillna("RUNNING"),
    })
    for metric, column in METRICS.items():
        table[column] = runs.get(f"metrics.{metric}")
    params = sorted(c for c in runs.columns if c.startswith("params.") and c.removeprefix("params.") not in CONTEXT)
    for column in params:
        table[column.removeprefix("params.")] = runs[column].map(parse_value)
    for name in CONTEXT:
        if f"params.{name}" in runs:
            table[name] = runs[f"params.{name}"].map(parse_value)
    if "tags.search.reason" in runs:
        table["reason"] = runs["tags.search.reason"]
    table["run_id"] = runs["run_id"]
    if complete_only:
        table = table[table["state"] == "COMPLETE"]
    table = table.assign(_order=table["state"].map(STATE_ORDER).fillna(9))
    table = table.sort_values(["_order", "val_accuracy", "trial"], ascending=[True, False, True], na_position="last")
    table = table.drop(columns="_order").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def parse_value(text):
    """MLflow stores params as strings: give numbers and booleans back their type for sorting and grouping."""
    if not isinstance(text, str):
        return text
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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


def parser() -> argparse.ArgumentParser:
    """The command line of search.results."""
    p = argparse.ArgumentParser(prog="python -m search.results", description=__doc__.split("\n")[0])
    p.add_argument("--study", action="append", required=True, help="study name (repeat for several)")
    p.add_argument("--storage", help="Optuna storage (for importances and plots)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workdir", default="mlruns")
    p.add_argument("--format", default="md", choices=FORMATS)
    p.add_argument("--top", type=int, help="only the best K rows")
    p.add_argument("--complete-only", action="store_true", help="leave out pruned and failed trials")
    p.add_argument("--out", help="write the table to this file instead of printing it")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print or write the leaderboard; exit 2 for an unknown study or store."""
    args = parser().parse_args(argv)
    try:
        table = leaderboard(args.study, args.tracking_uri, args.workdir, args.complete_only)
        text = to_text(table.head(args.top) if args.top else table, args.format)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {len(table.head(args.top) if args.top else table)} rows to {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
