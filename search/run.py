"""`python -m search.run`: run (or resume) a hyperparameter search. A thin layer over `search.drivers.run_search`.

    python -m search.run --space scratch_cnn                     # CIFAR-10 warm-up, minutes on a laptop CPU
    python -m search.run --space scratch_cnn --dataset stanford_dogs --breeds 10 --image-size 96
    python -m search.run --space my_space.yaml --trials 50 --timeout 3600

Exit codes: 0 done, 1 too many failed trials, 2 bad configuration (nothing run), 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import fields

from search.config import SearchConfig, range_problems
from search.errors import ConfigError, SearchAborted

BUDGET_STARTED = "SEARCH_BUDGET_STARTED"  # passes the time budget's start to the process that replaces this one


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a word where a number goes) as one line and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python -m search.run --help lists the flags)\n")


def parser() -> argparse.ArgumentParser:
    """The command line; every default comes from SearchConfig or the space file."""
    d = SearchConfig()
    p = OneLineParser(prog="python -m search.run", description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=d.space, help="shipped space name (scratch_cnn, ...) or a path to a .yaml file")
    p.add_argument("--dataset", help="cifar10 | stanford_dogs | folder:PATH (default: the space's)")
    p.add_argument("--data-dir", help="local copy of the data (default: Keras's cache, else download)")
    p.add_argument("--trials", type=int, help="study target of complete+pruned trials (default: the space's)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts (default: the space's; 0 = no limit)")
    p.add_argument("--refit", default=d.refit, metavar="FRACTION|auto",
                   help="fraction of --timeout kept to retrain the best configuration for the rest of the budget "
                        "(auto: 0.8 with a timeout and one objective, else 0; 0 = off; a refit starting before half "
                        "the timeout runs in two rounds, the second from the first's weights)")
    p.add_argument("--epochs", type=int, help="most epochs per trial (default: the space's)")
    p.add_argument("--subset", type=int, help="at most N images per split, stratified (0 = all; default: the space's)")
    p.add_argument("--image-size", type=int, help="input side in pixels, overriding the space")
    p.add_argument("--breeds", help="N (the first N breeds) or comma-separated breed names")
    p.add_argument("--crop", action="store_true", help="crop Stanford Dogs photos to their Annotation/ boxes")
    p.add_argument("--study-name", help="default <space>-<dataset>")
    p.add_argument("--storage", help="Optuna storage URL, or a file path for journal storage "
                                     "(default sqlite:///mlruns/optuna.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workdir", default=d.workdir, help="stores, caches, checkpoints, models (default mlruns/)")
    p.add_argument("--sampler", default=d.sampler, choices=["tpe", "random", "grid", "cmaes"])
    p.add_argument("--pruner", default=d.pruner, choices=["auto", "median", "hyperband", "sha", "none"],
                   help="auto (default): Hyperband over epochs when the run has a time budget, else median")
    p.add_argument("--baselines", action="store_true",
                   help="run the space's hand-made configurations first (the seed studies' grid), tagged as baselines")
    p.add_argument("--objectives", default=d.objectives,
                   help="val_accuracy[,train_seconds|inference_ms|params]: more than one = multi-objective "
                        "search, the leaderboard's --pareto shows the front")
    p.add_argument("--max-params", type=int, help="constraint: a model with more parameters is infeasible")
    p.add_argument("--max-inference-ms", type=float, help="constraint: a model slower per test image is infeasible")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="failed trials in a row before stopping")
    p.add_argument("--keep-models", type=int, default=d.keep_models, help="models of the best K trials kept on disk")
    p.add_argument("--warm-start", help="STUDY[:K]: start with the K best configurations of STUDY")
    p.add_argument("--rerun", metavar="STUDY:TRIAL", help="retrain one trial exactly (same parameters, seed, "
                                                           "split, image size, epochs) as a new MLflow run")
    p.add_argument("--study-patience", type=int, help="end the study after N completed trials without "
                                                       "--min-improvement (Keras's `patience` is per trial)")
    p.add_argument("--min-improvement", type=float, default=d.min_improvement,
                   help="validation-accuracy gain that counts as progress (default 0: any gain)")
    p.add_argument("--within", type=float, help="end the study after this many minutes without that gain")
    p.add_argument("--max-memory-growth", type=float, default=d.max_memory_growth, metavar="MB",
                   help="restart this process when it has grown by MB since its first trial (default: the space's "
                        "budget.max_memory_growth, else 400)")
    p.add_argument("--no-default-trial", dest="default_trial", action="store_false",
                   help="do not try the space's default configuration first in a new study")
    p.add_argument("--backbone", help="transfer space: restrict the backbone choice to NAME[,NAME...]")
    p.add_argument("--weights", help="transfer space: ImageNet weights file for the backbone, or 'none' "
                                     "(default: Keras's cache, else download)")
    p.add_argument("--driver", default=d.driver, choices=["optuna", "kerastuner"], help="who drives the search")
    p.add_argument("--tuner", default=d.tuner, choices=["hyperband", "bayesian", "random"],
                   help="Keras Tuner's tuner, with --driver kerastuner")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="processes sharing the study (with no --storage they share mlruns/optuna.journal)")
    p.add_argument("--mixed-precision", dest="mixed_precision", action=argparse.BooleanOptionalAction,
                   default=None, help="float16 compute on GPUs, bfloat16 on CPUs (default: on where the hardware multiplies it natively)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=d.report,
                   help="write the study report (HTML page and pictures) at the end (default: on, unless the "
                        "environment says SEARCH_REPORT=0); python -m search.results --study S --report DIR writes it "
                        "later")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """A SearchConfig from parsed arguments (only the fields it has)."""
    names = {f.name for f in fields(SearchConfig)}
    config = SearchConfig(**{k: v for k, v in vars(args).items() if k in names})
    if os.environ.get(BUDGET_STARTED):  # this process replaces one restarted for memory: same time budget
        config.budget_started = float(os.environ.pop(BUDGET_STARTED))
    return config


def restart(budget_started: float | None) -> None:
    """Replace this process by a fresh one with the same arguments: the study resumes where it stopped, within
    what is left of the same --timeout (its refit phase included)."""
    print("restarting with a fresh process (memory limit); the study resumes", flush=True)
    sys.stdout.flush()
    if budget_started:
        os.environ[BUDGET_STARTED] = repr(budget_started)
    os.execv(sys.executable, [sys.executable, "-m", "search.run", *sys.argv[1:]])


def rerun_trial(args: argparse.Namespace) -> int:
    """--rerun STUDY:TRIAL."""
    from search.rerun import rerun

    try:
        rerun(args.rerun, args.storage, args.tracking_uri, args.workdir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


INTERRUPTED_TRIAL = ("\ninterrupted: a running trial is recorded as killed; run the same command to resume the "
                     "study (such a trial from its last finished epoch).")


def main(argv: list[str] | None = None) -> int:
    """Run the search the arguments describe; return the exit code (Ctrl-C anywhere: 130, no traceback)."""
    try:
        return run_command(argv)
    except KeyboardInterrupt:  # before the search started (imports, set-up) or after it ended (the table)
        print("\ninterrupted.", file=sys.stderr)
        return 130


def run_command(argv: list[str] | None) -> int:
    """Parse, check the numbers, run, print the leaderboard."""
    args = parser().parse_args(argv)
    problems = range_problems(vars(args))
    if problems:  # nothing has been imported, opened or written yet
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stdout, force=True)
    # MLflow sets its own loggers' level when it is imported (later, by the search): "Creating initial MLflow
    # database tables", "Successfully registered model" repeat what the search says itself
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with ctrl_c_deferred():  # ~1 s of imports (Optuna, pandas, MLflow)
        from search import quiet_tensorflow_startup

        quiet_tensorflow_startup()
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from search.results import leaderboard, to_text
        from search.drivers import run_search

    config = config_from_args(args)
    if args.rerun:
        return rerun_trial(args)
    try:
        summary = run_search(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SearchAborted as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED_TRIAL, file=sys.stderr)
        return 130
    if summary.stopped == "memory" and argv is None:  # only a real command line is replaced
        restart(summary.budget_started)
    try:
        table = leaderboard([summary.study_name], tracking_uri=config.tracking_uri, workdir=config.workdir)
        refits = f" and {summary.refits} refit round{'s' * (summary.refits > 1)}" if summary.refits else ""
        print(f"\nstudy {summary.study_name}: {summary.counted - summary.refits} of {summary.target} trials{refits} "
              f"(this run: {summary.trials_run}); best val_accuracy "
              f"{'-' if summary.best_value is None else f'{summary.best_value:.4f}'} (trial {summary.best_trial})")
        if summary.ensemble:
            print(f"registered: the {summary.ensemble}")
        print(to_text(table.head(5), "md"))
        print(f"\nMLflow UI:   mlflow ui --backend-store-uri {summary.tracking_uri}")
        print(f"leaderboard: python -m search.results --study {summary.study_name} --format md")
    except KeyboardInterrupt:
        print(f"\ninterrupted while printing the results; the study is recorded: "
              f"python -m search.results --study {summary.study_name}", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold Ctrl-C until the block ends, then raise it. For imports: a KeyboardInterrupt raised inside a native
    module's initialisation can come out as another error with a traceback (pydantic-core, which MLflow imports,
    turns it into a SchemaError) or end the process by a signal after it was handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def exit_quietly_on_ctrl_c() -> None:
    """From here on (the interpreter shutting down: MLflow's and TensorFlow's exit handlers), Ctrl-C ends the
    process at once with 130 instead of a traceback from whatever handler it lands in."""
    def stop(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(130)

    signal.signal(signal.SIGINT, stop)


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a press that lands after main() handled one: Python would end by SIGINT, not 130
        code = 130
    exit_quietly_on_ctrl_c()
    sys.exit(code)
