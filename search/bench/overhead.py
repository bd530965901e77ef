"""`python -m search.bench overhead`: how much of a trial's wall time the harness itself costs.

Runs real one-epoch trials of the default scratch_cnn configuration on 10,000 CIFAR-10 training images
and splits each trial's wall time (Optuna's start to end) into model.fit, the test evaluation, and the
rest: model building, MLflow logging, Optuna bookkeeping, saving the model. Target: the rest < 5%.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import optuna

from runners.speed import matmul_gflops  # noqa: F401  (the benchmarks import it from here too)


def cpu_name() -> str:
    """The processor model, for the table's heading."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    """Run the trials and print the table."""
    p = argparse.ArgumentParser(prog="python -m search.bench overhead", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="CIFAR-10 location (as for search.run)")
    p.add_argument("--images", type=int, default=10_000, help="training images per trial")
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args(argv)

    from search.config import SearchConfig
    from search.stores import sqlite_url
    from search.space import default_params, load_space
    from search.drivers import run_search
    from search.stores import find_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"machine: {cpu_name()}, {matmul_gflops():.0f} GFLOP/s float32 matmul")
    with tempfile.TemporaryDirectory() as workdir:
        config = SearchConfig(space="scratch_cnn", data_dir=args.data_dir, trials=args.trials, epochs=1,
                              subset=args.images, sampler="random", pruner="none", workdir=workdir,
                              timeout=0, default_trial=False)
        # every trial trains the default configuration, so trials are comparable
        study = optuna.create_study(study_name="scratch_cnn-cifar10", direction="maximize",
                                    storage=sqlite_url(Path(workdir) / "optuna.db"))
        for _ in range(args.trials):
            study.enqueue_trial(default_params(load_space("scratch_cnn")))
        run_search(config)
        study = find_study("scratch_cnn-cifar10", workdir=workdir)
        rows = []
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
            fit, test = trial_seconds(workdir, t)
            rows.append((t.number, wall, fit, test, wall - fit - test))
    print(f"\n{'trial':>5} {'wall s':>8} {'fit s':>8} {'test s':>8} {'harness s':>10} {'harness %':>10}")
    for number, wall, fit, test, rest in rows:
        print(f"{number:>5} {wall:>8.2f} {fit:>8.2f} {test:>8.2f} {rest:>10.2f} {100 * rest / wall:>9.1f}%")
    total = [sum(col) for col in zip(*[r[1:] for r in rows])]
    print(f"{'all':>5} {total[0]:>8.2f} {total[1]:>8.2f} {total[2]:>8.2f} {total[3]:>10.2f} "
          f"{100 * total[3] / total[0]:>9.1f}%")
    return 0


def trial_seconds(workdir: str, trial) -> tuple[float, float]:
    """model.fit and test-evaluation seconds of a trial, from its MLflow run."""
    from mlflow import MlflowClient

    from search.stores import tracking_uri

    run = MlflowClient(tracking_uri(None, workdir)).get_run(trial.user_attrs["mlflow_run_id"])
    return run.data.metrics["train_seconds"], run.data.metrics["test_seconds"]
