"""The study report: one self-contained HTML page and the same pictures as PNGs, for a person to act on.

The page holds the leaderboard, the Pareto front of accuracy against cost, the parameter importances,
Optuna's plots (optimisation history, parallel coordinates, importances, slice, contour) as interactive
plotly figures with plotly's JavaScript inlined once (the page works offline), and the best trial's
learning curves and confusion matrix read back from its MLflow run. PNGs come from Optuna's matplotlib
backend (plotly's static export would need Chrome). `log_study_report` puts both on the study's own
MLflow run (`<study>`, tag search.role=study), created on first need and updated in place.
"""
from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.importance import FanovaImportanceEvaluator

from search.tables import importances, pareto_front, to_text

CURVES = ("accuracy", "val_accuracy", "loss", "val_loss")
STUDY_ROLE = "study"


# ---------------------------------------------------------------- what the pictures show


def best_run_id(table: pd.DataFrame) -> str | None:
    """The MLflow run of the leaderboard's best completed trial."""
    complete = table[table["state"] == "COMPLETE"]
    return None if complete.empty else complete.iloc[0]["run_id"]


def learning_curves(client, run_id: str) -> pd.DataFrame:
    """A trial's per-epoch accuracy and loss (train and validation), one row per epoch."""
    series = {name: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, name)})
              for name in CURVES}
    return pd.DataFrame(series).rename_axis("epoch")


def evaluation_file(client, run_id: str, name: str, folder: Path) -> Path | None:
    """One file of a trial's evaluation/ artifacts, downloaded into folder (None if the trial has none)."""
    try:
        return Path(client.download_artifacts(run_id, f"evaluation/{name}", str(folder)))
    except Exception:  # an older trial without evaluation artifacts: the report just leaves it out
        return None


SLICE_PARAMS = 6  # a slice panel per parameter: more than this makes a strip too wide to read


class FanovaOnce(FanovaImportanceEvaluator):
    """Optuna's fANOVA (seed 0) that keeps its answers: one report asks it the same question five times."""

    def __init__(self):
        super().__init__(seed=0)
        self.answers: dict = {}

    def evaluate(self, study, params=None, *, target=None) -> dict[str, float]:
        """fANOVA importances of study's params, computed on the first call only (one study, one target)."""
        key = tuple(params or ())
        if key not in self.answers:
            self.answers[key] = super().evaluate(study, params, target=target)
        return self.answers[key]


def ranked_params(study, evaluator: FanovaOnce) -> list[str]:
    """The study's parameters, most important first (empty with too few trials)."""
    return importances(study, evaluator)["param"].tolist()


def optuna_plots(study, backend, evaluator: FanovaOnce) -> dict:
    """Optuna's plots of a study with one backend (plotly or matplotlib), leaving out what cannot be drawn yet."""
    ranked = ranked_params(study, evaluator)
    # with several objectives every plot but the front shows the first, validation accuracy
    on = {} if len(study.directions) == 1 else {"target": lambda t: t.values[0], "target_name": "val_accuracy"}
    draws = {
        "optimization_history": lambda: backend.plot_optimization_history(study, **on),
        "parallel_coordinate": lambda: backend.plot_parallel_coordinate(study, **on),
        "param_importances": lambda: backend.plot_param_importances(study, evaluator=evaluator, **on),
        "slice": lambda: backend.plot_slice(study, params=ranked[:SLICE_PARAMS] or None, **on),
    }
    if len(ranked) >= 2:  # a contour of every pair would be unreadable: the two most important only
        draws["contour"] = lambda: backend.plot_contour(study, params=ranked[:2], **on)
    if len(study.directions) > 1:
        names = study.user_attrs.get("objectives", "").split(",")
        draws["pareto_front"] = lambda: backend.plot_pareto_front(
            study, target_names=names if len(names) == len(study.directions) else None)
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental" and says so on every call
        for name, draw in draws.items():
            try:
                figures[name] = draw()
            except (ValueError, RuntimeError, KeyError, ZeroDivisionError):  # too few trials for this plot
                continue
    return figures


# ---------------------------------------------------------------- PNGs (matplotlib)


def figure_of(axes):
    """The matplotlib figure behind what an Optuna plot returned (Axes or an array of them)."""
    return np.ravel(axes)[0].figure


def write_pngs(study, client, table: pd.DataFrame, folder: Path, evaluator: FanovaOnce) -> list[Path]:
    """The report's pictures as PNG files in folder."""
    import matplotlib

    matplotlib.use("Agg")
    import logging

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as backend

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its INFO notes about category axes are noise
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {name: figure_of(axes) for name, axes in optuna_plots(study, backend, evaluator).items()} if study else {}
    run_id = best_run_id(table)
    if run_id:
        curves = learning_curves(client, run_id)
        if not curves.dropna(how="all").empty:
            fig, ax = plt.subplots(figsize=(7, 4))
            curves.plot(ax=ax, marker="o", title="best trial: learning curves")
            figures["learning_curves"] = fig
    front = pareto_front(table)
    if not front.empty:
        figures["pareto_front"] = pareto_png(table, front)
    for name, fig in figures.items():
        fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # colour-bar axes are "not compatible"; the layout still fits
            fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        written.append(folder / f"{name}.png")
    if run_id and (matrix := evaluation_file(client, run_id, "confusion_matrix.png", folder)):
        written.append(matrix.rename(folder / "best_confusion_matrix.png"))
    return written


def pareto_png(table: pd.DataFrame, front: pd.DataFrame):
    """Validation accuracy against training time, the Pareto front marked."""
    import matplotlib.pyplot as plt

    done = table[table["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(done["train_seconds"], done["val_accuracy"], color="lightgray", label="completed trials")
    ax.scatter(front["train_seconds"], front["val_accuracy"], color="tab:red", label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(f"#{row['trial']}", (row["train_seconds"], row["val_accuracy"]), fontsize=8)
    ax.set(xlabel="training time (s)", ylabel="validation accuracy",
           title="accuracy against cost (front over time, inference time and size)")
    ax.legend()
    return fig


# ---------------------------------------------------------------- the HTML page (plotly)


def plotly_sections(study, client, table: pd.DataFrame, evaluator: FanovaOnce) -> list[tuple[str, object]]:
    """(title, plotly figure) for every interactive plot of the page."""
    import optuna.visualization as backend
    import plotly.express as px

    sections = ([(name.replace("_", " "), fig) for name, fig in optuna_plots(study, backend, evaluator).items()]
                if study else [])
    done = table[table["state"] == "COMPLETE"]
    if not done.empty:
        front = set(pareto_front(table)["trial"])
        points = done.assign(pareto=done["trial"].isin(front))
        sections.append(("accuracy against cost", px.scatter(
            points, x="train_seconds", y="val_accuracy", size=points["params"].clip(lower=1) ** 0.5,
            color="pareto", hover_data=["trial", "inference_ms", "params"],
            labels={"train_seconds": "training time (s)", "val_accuracy": "validation accuracy"})))
    run_id = best_run_id(table)
    if run_id:
        curves = learning_curves(client, run_id)
        if not curves.dropna(how="all").empty:
            sections.append(("best trial: learning curves", px.line(curves, markers=True)))
    return sections


def embedded_png(path: Path | None) -> str:
    """An <img> with the PNG inlined, so the page stays one file."""
    if path is None:
        return "<p>(no confusion matrix logged for this trial)</p>"
    return f'<img alt="confusion matrix" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def write_report(name: str, study, client, folder: Path, table: pd.DataFrame,
                 evaluator: FanovaOnce | None = None) -> Path:
    """Write `<folder>/<study>.html`: leaderboard, front, importances, plots, best trial; returns its path."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or FanovaOnce()
    figures = plotly_sections(study, client, table, evaluator)
    plots = [f"<h2>{html.escape(title)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0))
             for i, (title, fig) in enumerate(figures)]
    run_id = best_run_id(table)
    with tempfile.TemporaryDirectory() as scratch:
        matrix = evaluation_file(client, run_id, "confusion_matrix.png", Path(scratch)) if run_id else None
        pairs = evaluation_file(client, run_id, "confused_pairs.csv", Path(scratch)) if run_id else None
        best = [embedded_png(matrix), to_text(pd.read_csv(pairs), "html") if pairs else ""]
    found = importances(study, evaluator) if study is not None else pd.DataFrame()
    body = [
        f"<h1>Study {html.escape(name)}</h1>",
        f"<p>{len(table)} trials, {int((table['state'] == 'COMPLETE').sum())} completed. Ranked by validation "
        "accuracy; test accuracy is reported, never used to choose.</p>",
        "<h2>leaderboard</h2>", to_text(table, "html"),
        "<h2>Pareto front: accuracy against training time, inference time and parameters</h2>",
        to_text(pareto_front(table), "html"),
        "<h2>parameter importances (fANOVA)</h2>",
        to_text(found, "html") if not found.empty else "<p>(needs 2+ completed trials)</p>",
        *plots,
        "<h2>best trial: confusion matrix and most confused pairs</h2>", *best,
    ]
    path = folder / f"{name}.html"
    path.write_text(PAGE.format(title=html.escape(name), body="\n".join(body)))
    return path


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; }} img {{ max-width: 100%; }}</style></head>
<body>
{body}
</body></html>
"""


# ---------------------------------------------------------------- the study's MLflow run


def study_run(client, experiment_id: str, name: str) -> str:
    """The study-level run (named after the study, tag search.role=study), created on first need."""
    from search.tracking import ROLE

    found = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = '{STUDY_ROLE}'", max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=name, tags={ROLE: STUDY_ROLE, "optuna.study": name}).info.run_id


def log_study_report(client, experiment_id: str, name: str, study, table: pd.DataFrame,
                     folder: Path | None = None) -> str:
    """Write the report (into folder, if given) and log it with its PNGs to the study's run; returns the run id."""
    from search.tracking import temp_artifact_dir

    run_id = study_run(client, experiment_id, name)
    evaluator = FanovaOnce()  # the page and the PNGs show the same importances: compute them once
    with temp_artifact_dir() as scratch:
        out = Path(scratch) / "report"
        page = write_report(name, study, client, folder or out, table, evaluator)
        write_pngs(study, client, table, out / "plots", evaluator)
        table.to_csv(out / "leaderboard.csv", index=False)
        if folder is not None:
            (out / "report.html").write_bytes(page.read_bytes())
        else:
            page.rename(out / "report.html")
        client.log_artifacts(run_id, str(out), "report")
    client.set_terminated(run_id, "FINISHED")
    return run_id
