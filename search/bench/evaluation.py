"""`python -m search.bench evaluation`: what a completed trial pays for its per-trial evaluation artifacts.

Times `search.evaluation.log_evaluation` (tables, confusion-matrix PNG, one log_artifacts call to a real
SQLite MLflow store) for CIFAR-10's shape (10 classes, 10,000 test images) and Stanford Dogs' (120 breeds),
with synthetic predictions: the cost depends on the shapes, not on what the model learnt.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from search.bench.overhead import cpu_name
from search.evaluation import evaluate_predictions, log_evaluation, write_evaluation

SHAPES = [(10, 10_000), (120, 2_400), (120, 12_000)]


def predictions(classes: int, images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a model that is right about half the time."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, images)
    probabilities = rng.random((images, classes))
    probabilities[np.arange(images), truth] += rng.random(images) * classes / 4
    return truth, probabilities / probabilities.sum(axis=1, keepdims=True)


def measure(client, run_id: str, classes: int, images: int, repeats: int) -> dict:
    """Best-of-repeats seconds for the tables, the files with the PNG, and the whole logged step."""
    truth, probabilities = predictions(classes, images)
    names = [f"class {i}" for i in range(classes)]
    tables, files, logged = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        evaluation = evaluate_predictions(truth, probabilities, names)
        tables.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            write_evaluation(evaluation, Path(scratch) / "evaluation")
            files.append(time.perf_counter() - started)
        started = time.perf_counter()
        log_evaluation(client, run_id, truth, probabilities, names)
        logged.append(time.perf_counter() - started)
    return {"classes": classes, "test images": images, "tables ms": 1000 * min(tables),
            "files+PNG ms": 1000 * min(files), "logged total ms": 1000 * min(logged)}


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(prog="python -m search.bench evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from search.tracking import connect

    with tempfile.TemporaryDirectory() as root:
        client = connect(f"sqlite:///{root}/mlflow.db")
        experiment = client.create_experiment("bench", artifact_location=Path(root, "artifacts").as_uri())
        run_id = client.create_run(experiment).info.run_id
        measure(client, run_id, 10, 100, 1)  # warm-up: imports and the first matplotlib figure
        rows = [measure(client, run_id, classes, images, args.repeats) for classes, images in SHAPES]
    print(f"per-trial evaluation logging on {cpu_name()} (best of {args.repeats})")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".0f"))
    return 0
