"""Where a trained model fails: per-class accuracy, the confusion matrix and the most confused pairs.

`evaluate_predictions` turns test labels and predicted probabilities into plain tables (pandas), and
`log_evaluation` writes them with a confusion-matrix picture into one temporary folder that goes to the
trial's MLflow run in a single `log_artifacts` call (under `evaluation/`), so a trial pays a few hundred
milliseconds for it. With many classes (120 breeds) the picture shows only the worst-recognised ones,
sorted, so it stays readable; the CSV always holds the full matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

ARTIFACT_DIR = "evaluation"
PICTURE_CLASSES = 20  # beyond this many classes the picture shows the worst ones only
CONFUSED_PAIRS = 10


@dataclass
class Evaluation:
    """The test split's errors as tables with clean class names."""

    matrix: pd.DataFrame  # rows: true class, columns: predicted class, counts
    per_class: pd.DataFrame  # class, images, correct, accuracy (worst first)
    report_text: str  # scikit-learn's classification report
    report: pd.DataFrame  # the same as a table (precision, recall, f1-score, support)
    confused: pd.DataFrame  # true, predicted, count: the most frequent mistakes


def evaluate_predictions(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> Evaluation:
    """Tables of a model's test errors from the true labels and its predicted probabilities."""
    labels = list(range(len(class_names)))
    predicted = np.argmax(probabilities, axis=1)
    counts = confusion_matrix(y_true, predicted, labels=labels)
    matrix = pd.DataFrame(counts, index=pd.Index(class_names, name="true"),
                          columns=pd.Index(class_names, name="predicted"))
    images = counts.sum(axis=1)
    correct = np.diag(counts)
    per_class = pd.DataFrame({"class": class_names, "images": images, "correct": correct,
                              "accuracy": np.divide(correct, images, out=np.full(len(labels), np.nan),
                                                    where=images > 0)})
    per_class = per_class.sort_values(["accuracy", "class"]).reset_index(drop=True)
    kwargs = dict(labels=labels, target_names=class_names, zero_division=0)
    report_text = classification_report(y_true, predicted, digits=3, **kwargs)
    report = pd.DataFrame(classification_report(y_true, predicted, output_dict=True, **kwargs)).T
    return Evaluation(matrix, per_class, report_text, report.rename_axis("class").reset_index(),
                      most_confused(matrix))


def most_confused(matrix: pd.DataFrame, k: int = CONFUSED_PAIRS) -> pd.DataFrame:
    """The k most frequent (true, predicted) mistakes with their counts, largest first."""
    mistakes = matrix.stack().rename("count").reset_index()
    mistakes = mistakes[(mistakes["true"] != mistakes["predicted"]) & (mistakes["count"] > 0)]
    return mistakes.sort_values(["count", "true", "predicted"], ascending=[False, True, True]).head(k) \
        .reset_index(drop=True)


def picture_classes(evaluation: Evaluation, limit: int = PICTURE_CLASSES) -> list[str]:
    """The classes the picture shows: all of a small set, else the `limit` worst, worst first."""
    worst_first = evaluation.per_class["class"].tolist()
    return list(evaluation.matrix.index) if len(worst_first) <= limit else worst_first[:limit]


def picture_counts(evaluation: Evaluation, limit: int = PICTURE_CLASSES) -> pd.DataFrame:
    """The counts the picture shows: the chosen classes, and where the worst ones' other mistakes went."""
    shown = picture_classes(evaluation, limit)
    counts = evaluation.matrix.loc[shown, shown]
    if len(shown) < len(evaluation.matrix):  # mistakes into classes not shown would vanish without this column
        counts = counts.assign(**{"(other classes)": evaluation.matrix.loc[shown].sum(axis=1) - counts.sum(axis=1)})
    return counts


def plot_confusion_matrix(evaluation: Evaluation, path: Path, limit: int = PICTURE_CLASSES) -> Path:
    """A readable confusion-matrix PNG: every class when few, else the worst `limit` classes (worst first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = picture_counts(evaluation, limit)
    values = counts.to_numpy()
    rows, columns = values.shape
    fig, ax = plt.subplots(figsize=(3 + 0.45 * columns, 2.5 + 0.45 * rows), dpi=90)
    ax.imshow(values, cmap="Blues")
    dark = values.max() / 2
    for (row, column), value in np.ndenumerate(values):
        if value:  # zeros left blank: fewer texts to draw, and the mistakes stand out
            ax.text(column, row, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > dark else "black")
    ax.set_xticks(range(columns), counts.columns, rotation=90)
    ax.set_yticks(range(rows), counts.index)
    ax.set(xlabel="predicted", ylabel="true")
    total = len(evaluation.matrix)
    ax.set_title("confusion matrix (test split)" if rows == total else
                 f"confusion matrix: the {rows} worst of {total} classes (test split)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_evaluation(evaluation: Evaluation, folder: Path) -> Path:
    """Write the tables and the picture into folder; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.matrix.to_csv(folder / "confusion_matrix.csv")
    evaluation.per_class.to_csv(folder / "per_class_accuracy.csv", index=False)
    evaluation.report.to_csv(folder / "classification_report.csv", index=False)
    (folder / "classification_report.txt").write_text(evaluation.report_text)
    evaluation.confused.to_csv(folder / "confused_pairs.csv", index=False)
    plot_confusion_matrix(evaluation, folder / "confusion_matrix.png")
    return folder


def log_evaluation(client, run_id: str, y_true: np.ndarray, probabilities: np.ndarray,
                   class_names: list[str]) -> Evaluation:
    """Evaluate a trial's test predictions and log every table and the picture in one artifacts call."""
    from search.tracking import temp_artifact_dir

    evaluation = evaluate_predictions(y_true, probabilities, class_names)
    with temp_artifact_dir() as scratch:
        folder = write_evaluation(evaluation, Path(scratch) / ARTIFACT_DIR)
        client.log_artifacts(run_id, str(folder), ARTIFACT_DIR)
    return evaluation
