"""Optuna (TPE + median pruner) against Keras Tuner (Hyperband) on one space, data subset and time budget.

    python -m search.bench drivers --budget 300 --subset 3000 --data-dir DIR

Each driver runs the same space (scratch_cnn by default) on the same subset, with the same `--timeout`
(no trial starts after it; the running one finishes, so compute can overrun by one trial) and no trial
cap. The table comes from MLflow through `search.results.compare`, so both drivers are measured the same
way: compute time is the sum of their trial runs' durations (pruned and failed trials included), and
"seconds_to_best" is the compute spent when the best model appeared. The plot of best accuracy against
compute time goes to <workdir>/reports/.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

DRIVERS = {"optuna": {"driver": "optuna", "sampler": "tpe", "pruner": "median"},
           "kerastuner": {"driver": "kerastuner", "tuner": "hyperband"}}


def parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="python -m search.bench drivers", description=__doc__.split("\n")[0])
    p.add_argument("--space", default="scratch_cnn")
    p.add_argument("--budget", type=float, default=300, help="seconds per driver after which no trial starts")
    p.add_argument("--subset", type=int, default=3000, help="images per split")
    p.add_argument("--epochs", type=int, help="most epochs per trial, Hyperband's max_epochs (default: the space's)")
    p.add_argument("--data-dir", help="local CIFAR-10 copy (default: Keras's cache)")
    p.add_argument("--workdir", help="stores and reports (default: a fresh temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run_driver(name: str, args: argparse.Namespace, workdir: Path) -> tuple[str, float]:
    """One driver's study under the time budget; its study name and wall-clock seconds."""
    from search.config import SearchConfig
    from search.drivers import run_search

    study = f"bench-{args.space}-{name}"
    config = SearchConfig(space=args.space, data_dir=args.data_dir, subset=args.subset, epochs=args.epochs,
                          timeout=args.budget, trials=10_000, seed=args.seed, workdir=str(workdir),
                          study_name=study, **DRIVERS[name])
    started = time.perf_counter()
    run_search(config)
    return study, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run both drivers, then print the comparison table and where the plot went."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from search.results import compare, plot_comparison, to_text

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-drivers-"))
    studies, wall = [], {}
    for name in DRIVERS:
        study, seconds = run_driver(name, args, workdir)
        studies.append(study)
        wall[study] = seconds
        print(f"{name}: {seconds:.0f} s wall clock", flush=True)
    table, costs = compare(studies, workdir=str(workdir))
    table.insert(2, "wall_seconds", table["study"].map(wall))
    print(f"\nspace {args.space}, subset {args.subset} images per split, budget {args.budget:.0f} s per driver")
    print(to_text(table, "md"))
    print(f"plot: {plot_comparison(costs, workdir / 'reports' / 'compare-drivers.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
