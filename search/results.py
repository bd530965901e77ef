"""`python -m search.results`: the leaderboard of a study, read back from MLflow with pandas.

    python -m search.results --study scratch_cnn-cifar10 --format md --top 10
    python -m search.results --study scratch_cnn-cifar10 --format csv --out leaderboard.csv
    python -m search.results --study scratch_cnn-cifar10 --group-by loss,pooling    # the seed studies' tables
    python -m search.results --study scratch_cnn-cifar10 --pareto --importances     # cost vs accuracy
    python -m search.results --all --report reports/     # every study side by side, one HTML page each
    python -m search.results --disk                       # what each study keeps on disk, in MB
    python -m search.results --prune scratch_cnn-cifar10  # keep the best model only; drop what failed trials left

One row per trial, best first: completed trials by validation accuracy (model selection never looks at
test accuracy), then pruned, then failed ones (`--complete-only` leaves those out). Every trial run in
MLflow carries its params, metrics and state, so the table needs nothing else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from search.stores import tracking_uri as resolve_tracking_uri
from search.errors import ConfigError
from search.tables import FORMATS, importances, pareto_front, side_by_side, to_text

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "KILLED": 3, "RUNNING": 4}
METRICS = {"best_val_accuracy": "val_accuracy", "test_accuracy": "test_accuracy",
           "test_top3_accuracy": "test_top3", "best_val_loss": "val_loss", "train_seconds": "train_seconds",
           "inference_ms": "inference_ms", "param_count": "params", "epochs_run": "epochs",
           "budget_fraction": "budget", "process_peak_rss_mb": "peak_rss_mb"}
CONTEXT = ["dataset", "subset", "epochs_max", "patience", "seed", "model"]


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
    # where a trial came from: the sampler, the default, a warm start or a hand-made baseline (--baselines)
    table["source"] = runs.get("tags.search.source", pd.Series("sampler", index=runs.index)).fillna("sampler")
    if "tags.search.feasible" in runs:
        table["feasible"] = runs["tags.search.feasible"].map(parse_value)
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


def at_epochs(table: pd.DataFrame, epochs: int, tracking_uri: str | None = None,
              workdir: str = "mlruns") -> pd.DataFrame:
    """The leaderboard at equal fidelity: each trial's best validation accuracy within its first `epochs` epochs,
    from its MLflow metric history; trials that stopped earlier (pruned after fewer epochs) are left out."""
    from search.tracking import connect

    client = connect(resolve_tracking_uri(tracking_uri, workdir))
    values = []
    for run_id in table["run_id"]:
        history = [m.value for m in sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]
        values.append(max(history[:epochs]) if len(history) >= epochs else None)
    ranked = table.assign(val_accuracy=values, epochs=epochs).dropna(subset=["val_accuracy"])
    ranked = ranked.drop(columns=["rank", "test_accuracy", "test_top3"], errors="ignore")  # tests were of the final model
    ranked = ranked.sort_values(["val_accuracy", "trial"], ascending=[False, True]).reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


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



def all_studies(tracking_uri: str | None = None, workdir: str = "mlruns") -> list[str]:
    """Every study (experiment) in the MLflow store, for --all."""
    from search.tracking import connect, study_experiments

    return sorted(study_experiments(connect(resolve_tracking_uri(tracking_uri, workdir))))



def group_table(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per value (or combination) of some parameters: trials, completed, best and mean validation accuracy.

    Every trial falls in exactly one row (a parameter a trial did not use is its own group, shown empty), so
    the trial counts add up to the leaderboard's length; accuracies are over completed trials only."""
    unknown = [name for name in by if name not in table.columns]
    if unknown:
        known = [c for c in table.columns if c not in ("rank", "run_id", "reason")]
        raise ConfigError(f"cannot group by {', '.join(unknown)}: not a column of the leaderboard. "
                          f"Available: {', '.join(known)}.")
    complete = table["val_accuracy"].where(table["state"] == "COMPLETE")
    grouped = table.assign(_complete=table["state"] == "COMPLETE", _accuracy=complete).groupby(by, dropna=False)
    summary = grouped.agg(trials=("trial", "size"), complete=("_complete", "sum"),
                          best_val_accuracy=("_accuracy", "max"), mean_val_accuracy=("_accuracy", "mean"))
    return summary.reset_index().sort_values(["best_val_accuracy", "trials"], ascending=False,
                                             na_position="last").reset_index(drop=True)




def optuna_study(name: str, storage: str | None, workdir: str):
    """The Optuna study of a name, or None when only MLflow knows it (another driver's study)."""
    from search.stores import find_study

    try:
        return find_study(name, storage, workdir)
    except ConfigError:
        return None


def parser() -> argparse.ArgumentParser:
    """The command line of search.results."""
    p = argparse.ArgumentParser(prog="python -m search.results", description=__doc__.split("\n")[0])
    p.add_argument("--study", action="append", help="study name (repeat for a leaderboard across studies)")
    p.add_argument("--all", action="store_true", help="every study in the MLflow store, in one leaderboard")
    p.add_argument("--storage", help="Optuna storage (for importances and plots)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workdir", default="mlruns")
    p.add_argument("--format", default="md", choices=FORMATS)
    p.add_argument("--top", type=int, help="only the best K rows")
    p.add_argument("--complete-only", action="store_true", help="leave out pruned and failed trials")
    p.add_argument("--group-by", help="PARAM[,PARAM]: trials, best and mean validation accuracy per value")
    p.add_argument("--at-epochs", type=int, metavar="N",
                   help="equal fidelity: rank every trial that reached N epochs by its best val accuracy in them")
    p.add_argument("--pareto", action="store_true",
                   help="only the Pareto front of accuracy against training time, inference time and size")
    p.add_argument("--importances", action="store_true", help="also Optuna's parameter importances per study")
    p.add_argument("--report", metavar="DIR", help="write one self-contained HTML report per study into DIR")
    p.add_argument("--out", help="write the table to this file instead of printing it")
    p.add_argument("--disk", action="store_true",
                   help="what each study (--study, default all) keeps under --workdir: kept models, MLflow "
                        "artifacts, checkpoints, reports, in MB; then the shared caches and stores")
    p.add_argument("--prune", metavar="STUDY",
                   help="free a finished study's disk: remove its kept models but the best trial's, the MLflow "
                        "artifacts of its pruned and failed trials, and its empty checkpoint folders")
    p.add_argument("--compare", nargs="+", metavar="STUDY",
                   help="studies side by side (best val/test accuracy, trials, compute time) and a PNG of best "
                        "accuracy against compute time, written into --out DIR (default <workdir>/reports/)")
    return p


def chosen_table(table: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """The table the flags ask for: grouped, the Pareto front, or the leaderboard (top K)."""
    if args.group_by:
        table = group_table(table, [name.strip() for name in args.group_by.split(",") if name.strip()])
    elif args.pareto:
        table = pareto_front(table)
    return table.head(args.top) if args.top else table


def importance_sections(studies: list[str], args: argparse.Namespace) -> list[str]:
    """Each study's parameter importances as a titled table (Optuna studies only)."""
    sections = []
    for name in studies:
        study = optuna_study(name, args.storage, args.workdir)
        found = importances(study) if study is not None else pd.DataFrame()
        body = to_text(found, args.format) if not found.empty else "(needs an Optuna study with 2+ completed trials)"
        sections.append(f"parameter importances (fANOVA), {name}:\n{body}")
    return sections


def write_reports(studies: list[str], args: argparse.Namespace) -> list[Path]:
    """One HTML report per study into --report DIR."""
    from search.report import write_report
    from search.tracking import connect

    client = connect(resolve_tracking_uri(args.tracking_uri, args.workdir))
    return [write_report(name, optuna_study(name, args.storage, args.workdir), client, Path(args.report),
                         leaderboard([name], args.tracking_uri, args.workdir))
            for name in studies]


def main(argv: list[str] | None = None) -> int:
    """Print or write the leaderboard (or its grouping, front, importances, reports); exit 2 on bad input."""
    args = parser().parse_args(argv)
    if args.compare:
        return print_comparison(args)
    if args.disk or args.prune:
        return print_disk(args)
    try:
        if not args.study and not args.all:
            raise ConfigError("name a study with --study NAME (repeat for several), or use --all")
        studies = all_studies(args.tracking_uri, args.workdir) if args.all else args.study
        table = leaderboard(studies, args.tracking_uri, args.workdir, args.complete_only)
        if args.at_epochs:
            table = at_epochs(table, args.at_epochs, args.tracking_uri, args.workdir)
        if len(studies) > 1:
            table = side_by_side(table)
        shown = chosen_table(table, args)
        text = to_text(shown, args.format)
        if args.importances:
            text = "\n\n".join([text, *importance_sections(studies, args)])
        reports = write_reports(studies, args) if args.report else []
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {len(shown)} rows to {args.out}")
    else:
        print(text)
    for path in reports:
        print(f"report: {path}")
    return 0


def trial_costs(runs: pd.DataFrame) -> pd.DataFrame:
    """Each ended trial run in the order it started: its study, state, seconds, and the study's best accuracy so far."""
    ended = runs[runs["end_time"].notna()].sort_values("start_time")
    # a completed trial's own trial_seconds (build, fit, test): its run's end moves when the best model is
    # logged later; a pruned or failed trial costs its run's duration
    duration = (ended["end_time"] - ended["start_time"]).dt.total_seconds()
    table = pd.DataFrame({
        "study": ended["tags.optuna.study"], "trial": ended["tags.optuna.trial_number"].astype(int),
        "state": ended["tags.search.state"].fillna("RUNNING"),
        "seconds": ended.get("metrics.trial_seconds", duration).fillna(duration),
        "val_accuracy": ended.get("metrics.best_val_accuracy"),
        "test_accuracy": ended.get("metrics.test_accuracy"),
    })
    table["compute_seconds"] = table.groupby("study")["seconds"].cumsum()
    complete = table["val_accuracy"].where(table["state"] == "COMPLETE")
    table["best_so_far"] = complete.groupby(table["study"]).cummax()
    table["best_so_far"] = table.groupby("study")["best_so_far"].ffill()  # pruned and failed trials keep the best
    return table.reset_index(drop=True)


def compare(studies: list[str], tracking_uri: str | None = None, workdir: str = "mlruns") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per study (best validation and test accuracy, trials run, compute time) and the per-trial costs."""
    runs = trial_runs(studies, tracking_uri, workdir)
    costs = trial_costs(runs) if not runs.empty else pd.DataFrame(
        columns=["study", "trial", "state", "seconds", "val_accuracy", "test_accuracy", "compute_seconds",
                 "best_so_far"])
    rows = []
    for name in studies:
        mine = costs[costs["study"] == name]
        complete = mine[mine["state"] == "COMPLETE"]
        best = complete.loc[complete["val_accuracy"].idxmax()] if not complete.empty else None
        rows.append({"study": name, "driver": study_driver(runs, name),
                     "trials": len(mine), "complete": len(complete), "pruned": int((mine["state"] == "PRUNED").sum()),
                     "failed": int((mine["state"] == "FAIL").sum()),
                     "best_val_accuracy": None if best is None else best["val_accuracy"],
                     "test_accuracy": None if best is None else best["test_accuracy"],
                     "best_trial": None if best is None else int(best["trial"]),
                     "seconds_to_best": None if best is None else best["compute_seconds"],
                     "compute_seconds": mine["seconds"].sum()})
    return pd.DataFrame(rows), costs


def study_driver(runs: pd.DataFrame, study: str) -> str:
    """Who drove a study's trials: the search.driver tag of its runs (the Optuna driver sets none)."""
    if runs.empty or "tags.search.driver" not in runs:
        return "optuna"
    tags = runs.loc[runs["tags.optuna.study"] == study, "tags.search.driver"].dropna()
    return tags.iloc[0] if not tags.empty else "optuna"


def plot_comparison(costs: pd.DataFrame, path: Path) -> Path:
    """A PNG of each study's best validation accuracy so far against its cumulative compute time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in costs.dropna(subset=["best_so_far"]).groupby("study", sort=False):
        ax.step(curve["compute_seconds"] / 60, curve["best_so_far"], where="post", marker="o", markersize=3,
                label=name)
    ax.set_xlabel("cumulative compute time of trials (minutes)")
    ax.set_ylabel("best validation accuracy so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_comparison(args: argparse.Namespace) -> int:
    """--compare: print the studies' table and write the plot; exit 2 for an unknown study or store."""
    try:
        table, costs = compare(args.compare, args.tracking_uri, args.workdir)
        text = to_text(table, args.format)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else Path(args.workdir).expanduser() / "reports"
    name = "compare-" + "-vs-".join(s.replace("/", "_") for s in args.compare) + ".png"
    print(text)
    print(f"plot: {plot_comparison(costs, folder / name)}")
    return 0


def print_disk(args: argparse.Namespace) -> int:
    """--disk: the footprint tables; --prune STUDY: prune, then say what was freed. Exit 2 for a bad study."""
    from search.disk import disk_usage, prune_study, prune_text

    try:
        if args.prune:
            print(prune_text(prune_study(args.prune, args.tracking_uri, args.workdir)))
            return 0
        table, shared = disk_usage(args.study, args.tracking_uri, args.workdir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fmt = "md" if args.format == "latex" else args.format
    print(to_text(table, fmt) if not table.empty else "no study has files here", to_text(shared, fmt), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
