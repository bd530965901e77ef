"""Results a person can act on, built from one short real study: tables, groupings, front, report, evaluation."""
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import TrialState

from conftest import TINY_SPACE, write_space
from search.config import SearchConfig
from search.evaluation import evaluate_predictions, picture_classes, picture_counts, plot_confusion_matrix
from search.report import log_study_report
from search.results import FORMATS, leaderboard, main, pareto_front
from search.drivers import run_search

NAME, SECOND = "tiny-cifar10", "tiny-second"


@dataclass
class Finished:
    """A study that ran, and where it lives."""

    workdir: Path
    uri: str
    study: optuna.Study
    table: pd.DataFrame

    def args(self, *more: str) -> list[str]:
        return ["--tracking-uri", self.uri, "--workdir", str(self.workdir), *more]


@pytest.fixture(scope="module")
def finished(cifar_dir, tmp_path_factory) -> Finished:
    """Four trials of the tiny space on 300 CIFAR-10 images, and a one-trial second study beside it."""
    root = tmp_path_factory.mktemp("results")
    workdir = root / "mlruns"
    space = write_space(root, TINY_SPACE)
    common = dict(space=str(space), data_dir=str(cifar_dir), sampler="random", workdir=str(workdir), report=True)
    run_search(SearchConfig(trials=4, **common))
    run_search(SearchConfig(trials=1, study_name=SECOND, **common))
    uri = f"sqlite:///{workdir}/mlflow.db"
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{workdir}/optuna.db")
    return Finished(workdir, uri, study, leaderboard([NAME], uri))


def printed(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_the_best_row_is_the_studys_best_trial(finished):
    best = finished.table.iloc[0]
    assert best["trial"] == finished.study.best_trial.number
    assert best["val_accuracy"] == pytest.approx(finished.study.best_value)
    assert len(finished.table) == len(finished.study.trials)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_holds_every_trial_best_first(finished, capsys, fmt):
    text = printed(capsys, finished.args("--study", NAME, "--format", fmt))
    best = f"{finished.study.best_value:.4g}"
    if fmt == "csv":
        table = pd.read_csv(io.StringIO(text))
        assert table["trial"].tolist() == finished.table["trial"].tolist()
        best = f"{table['val_accuracy'].iloc[0]}"
    elif fmt == "md":
        assert len([line for line in text.splitlines() if line.startswith("|")]) == len(finished.table) + 2
    elif fmt == "html":
        assert text.count("<tr") == len(finished.table) + 1
    else:
        assert "\\begin{tabular}" in text
    assert best in text


def test_group_by_counts_add_up_to_the_trials(finished, capsys):
    text = printed(capsys, finished.args("--study", NAME, "--group-by", "loss,pooling", "--format", "csv"))
    groups = pd.read_csv(io.StringIO(text))
    assert list(groups.columns[:2]) == ["loss", "pooling"]
    assert groups["trials"].sum() == len(finished.table)
    complete = finished.table[finished.table["state"] == "COMPLETE"]
    top = groups.iloc[0]
    mine = complete[(complete["loss"] == top["loss"]) & (complete["pooling"] == top["pooling"])]
    assert top["best_val_accuracy"] == pytest.approx(mine["val_accuracy"].max())
    assert top["best_val_accuracy"] == pytest.approx(finished.study.best_value)


def test_group_by_an_unknown_parameter_exits_2_naming_it(finished, capsys):
    assert main(finished.args("--study", NAME, "--group-by", "colour")) == 2
    assert "cannot group by colour" in capsys.readouterr().err


def test_the_pareto_front_starts_with_the_most_accurate_trial_and_nothing_on_it_is_dominated(finished):
    front = pareto_front(finished.table)
    assert front.iloc[0]["trial"] == finished.study.best_trial.number
    costs = ["train_seconds", "inference_ms", "params"]
    complete = finished.table[finished.table["state"] == "COMPLETE"]
    for _, row in front.iterrows():
        others = complete[complete["trial"] != row["trial"]]
        beats = (others["val_accuracy"] >= row["val_accuracy"]) & (others[costs] <= row[costs]).all(axis=1)
        assert not beats.any()


def test_importances_name_the_studys_parameters(finished, capsys):
    text = printed(capsys, finished.args("--study", NAME, "--importances", "--format", "csv"))
    section = text.split("parameter importances (fANOVA), tiny-cifar10:\n")[1]
    importances = pd.read_csv(io.StringIO(section))
    varied = {name for t in finished.study.trials for name in t.params}
    assert set(importances["param"]) <= varied and len(importances) >= 2
    assert importances["importance"].sum() == pytest.approx(1.0)


def test_one_leaderboard_across_studies_puts_study_dataset_and_costs_side_by_side(finished, capsys):
    text = printed(capsys, finished.args("--all", "--format", "csv"))
    table = pd.read_csv(io.StringIO(text))
    assert set(table["study"]) == {NAME, SECOND}
    assert list(table.columns[1:3]) == ["study", "dataset"]
    assert {"train_seconds", "inference_ms", "params"} <= set(table.columns)
    named = pd.read_csv(io.StringIO(printed(capsys, finished.args("--study", NAME, "--study", SECOND,
                                                                  "--format", "csv"))))
    assert len(named) == len(table)


def test_an_unknown_study_exits_2_listing_the_known_ones(finished, capsys):
    assert main(finished.args("--study", "nope")) == 2
    assert "tiny-cifar10" in capsys.readouterr().err


def test_the_report_is_one_self_contained_page_per_study(finished, capsys, tmp_path):
    text = printed(capsys, finished.args("--study", NAME, "--study", SECOND, "--report", str(tmp_path)))
    assert f"report: {tmp_path / (NAME + '.html')}" in text
    page = (tmp_path / f"{NAME}.html").read_text()
    assert (tmp_path / f"{SECOND}.html").is_file()
    assert "<script src=" not in page and page.count("Plotly.newPlot") >= 5  # nothing fetched: works offline
    assert len(re.findall(r"plotly\.js v\d", page)) == 1  # the library inlined once
    for title in ("optimization history", "parallel coordinate", "param importances", "slice", "contour",
                  "best trial: learning curves", "leaderboard", "Pareto front"):
        assert title in page
    assert 'src="data:image/png;base64,' in page  # the best trial's confusion matrix


def test_the_study_run_holds_the_report_and_its_plots(finished):
    client = MlflowClient(finished.uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], "tags.`search.role` = 'study'")
    assert len(runs) == 1 and runs[0].info.run_name == NAME
    plots = {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "report/plots")}
    assert {"optimization_history.png", "parallel_coordinate.png", "param_importances.png", "slice.png",
            "learning_curves.png", "pareto_front.png", "best_confusion_matrix.png"} <= plots
    files = {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"report.html", "leaderboard.csv"} <= files


def test_a_report_computes_the_importances_once(finished, tmp_path, monkeypatch):
    computed = []  # the page's table, its ranking, and both backends' bar charts ask the same question
    fanova = FanovaImportanceEvaluator.evaluate
    monkeypatch.setattr(FanovaImportanceEvaluator, "evaluate",
                        lambda self, *args, **kwargs: computed.append(1) or fanova(self, *args, **kwargs))
    client = MlflowClient(finished.uri)
    experiment = client.get_experiment_by_name(NAME)
    log_study_report(client, experiment.experiment_id, NAME, finished.study, finished.table, tmp_path)
    assert len(computed) == 1
    assert "parameter importances (fANOVA)" in (tmp_path / f"{NAME}.html").read_text()


def test_every_completed_trial_logs_its_test_errors_with_class_names(finished, tmp_path):
    client = MlflowClient(finished.uri)
    for trial in finished.study.get_trials(states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs["mlflow_run_id"]
        folder = Path(client.download_artifacts(run_id, "evaluation", str(tmp_path / str(trial.number))))
        assert {"confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv", "classification_report.txt",
                "classification_report.csv", "confused_pairs.csv"} <= {p.name for p in folder.iterdir()}
        matrix = pd.read_csv(folder / "confusion_matrix.csv", index_col=0)
        assert list(matrix.index) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck"]
        accuracy = np.trace(matrix.to_numpy()) / matrix.to_numpy().sum()
        assert accuracy == pytest.approx(client.get_run(run_id).data.metrics["test_accuracy"])
        pairs = pd.read_csv(folder / "confused_pairs.csv")
        assert len(pairs) <= 10 and (pairs["true"] != pairs["predicted"]).all()
        assert pairs["count"].is_monotonic_decreasing
        assert pairs.iloc[0]["count"] == max(matrix.loc[t, p] for t in matrix.index for p in matrix.columns if t != p)
        assert "macro avg" in (folder / "classification_report.txt").read_text()


def test_the_picture_of_120_breeds_shows_only_the_worst_ones(dogs_dir, tmp_path):
    from runners.photos import list_stanford_dogs

    breeds = list_stanford_dogs(dogs_dir).class_names
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(120), 10)
    probabilities = rng.random((len(truth), 120))
    probabilities[np.arange(len(truth)), truth] += np.linspace(0, 2, 120)[truth]  # later breeds easier
    evaluation = evaluate_predictions(truth, probabilities, breeds)
    shown = picture_classes(evaluation)
    assert len(shown) == 20 and shown == evaluation.per_class["class"].tolist()[:20]
    assert breeds[0] in shown and breeds[-1] not in shown
    counts = picture_counts(evaluation)  # every mistake of a shown breed stays visible, if only as "other"
    assert (counts.sum(axis=1) == evaluation.matrix.loc[shown].sum(axis=1)).all()
    from PIL import Image

    with Image.open(plot_confusion_matrix(evaluation, tmp_path / "m.png")) as picture:
        assert max(picture.size) < 1400
