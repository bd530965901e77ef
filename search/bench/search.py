"""`python -m search.bench search`: what the search buys over random search, a baseline and a plain reference CNN.

    python -m search.bench search --dataset cifar10 --budget 3600
    python -m search.bench search --dataset stanford_dogs --image-size 128 --budget 5400 --data-dir DIR

Runs, one after the other on the same machine and data, each for the same wall-clock budget:
  search     the harness's default search (Optuna TPE + Hyperband over epochs, the default pruner of a
             time-budgeted run; the space's defaults tried first; the last 80% of the budget refits the best,
             in a round that ends at half the budget and a warm restart from it; at the end the greedy
             ensemble of the kept models when it beats the best one on validation);
  random     random search, no pruner, no default trial, no refit;
  default    the space's default configuration trained once for the whole budget, with the refit's schedule
             (epochs planned from a timed first epoch, the schedule ending with the last epoch that fits the
             budget): the yardstick the search must beat;
  baseline   the space's best hand-made baseline (search.space.baseline_trials), trained once;
  reference  a plain CNN a skilled Keras user would write without any search (REFERENCE below), trained once.
A single training's epoch count comes from a timed first epoch (PLAN_SLACK more, since the first epoch also
traces the model); after every epoch its deadline (runners.callbacks.Deadline, as the search's refit's) brings the
learning-rate schedule's end to the last epoch that fits and stops training there, so the schedule anneals at
the budget's end whatever the epochs turn out to take. Each arm's curve (elapsed seconds, best validation
accuracy so far, test accuracy of that model) goes to <out>/<arm>.csv, its facts (machine rate before it,
training rate) to <out>/<arm>.json. The table and the plot <out>/search_benchmark.png are drawn from every arm
saved under --out, so a long benchmark can be run one arm at a time. Models are chosen by validation accuracy
only; test accuracy is reported.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from runners.device import cpu_count
from runners.train import forward_flops
from search.bench.overhead import matmul_gflops
from search.bench.transfer import cpu_name, has_avx512
from search.config import PLAN_SLACK

ARMS = ("search", "random", "default", "baseline", "reference")
DESCRIPTIONS = {"search": "harness default search (TPE + Hyperband, then refit)",
                "random": "random search, no pruner",
                "default": "the space's default, trained once for the budget",
                "baseline": "best hand-made baseline, trained once",
                "reference": "plain reference CNN, trained once"}
# the search arms: SearchConfig settings besides the shared ones (the rest are the harness's defaults)
SEARCH_ARMS = {"search": {},
               "random": {"sampler": "random", "pruner": "none", "default_trial": False, "refit": 0}}

# The reference (d): what a skilled Keras user writes without any search. Overrides of the space's defaults;
# the layouts themselves are the named architectures of spaces/scratch_cnn.yaml.
REFERENCE = {
    "cifar10": {
        "architecture": "reference_cifar",     # 3 blocks x 2 conv3x3+BN+ReLU (32, 64, 128 filters) + max pool, GAP
        "optimizer": "adamw",
        "weight_decay": 1e-4,                  # per step, decoupled; the space's default
        "learning_rate": 3e-3,                 # peak, cosine decay to 0 over the whole budget
        "lr_schedule": "cosine",
        "dropout": 0.2,                        # fraction, before the softmax
        "batch_size": 128,                     # images per step
        "augmentation": "flip_translate10",    # horizontal flip + translate up to 10% of the side
        "loss": "categorical_crossentropy",
        "label_smoothing": 0.0,
    },
    "stanford_dogs": {
        "architecture": "reference_dogs",      # stem conv3x3/2 32 + BN + ReLU + max pool, 3 blocks x 2 conv3x3
                                               # (64, 128, 256) + max pool, GAP: 1.2M parameters
        "optimizer": "adamw",
        "weight_decay": 5e-4,
        "learning_rate": 2e-3,                 # peak, after a linear warm-up over the first 5% of the steps
        "lr_schedule": "warmup_cosine",
        "dropout": 0.3,
        "batch_size": 64,
        "augmentation": "flip_translate_zoom",  # flip + translate 10% + zoom 10%
        "loss": "categorical_crossentropy",
        "label_smoothing": 0.0,
    },
}
DEFAULT_BUDGET = {"cifar10": 3600, "stanford_dogs": 5400}         # seconds per arm
CHECKPOINTS = {"cifar10": (1 / 6, 1 / 3, 1 / 2, 3 / 4, 1),         # of the budget: 10, 20, 30, 45, 60 min at 1 h
               "stanford_dogs": (1 / 2, 1)}                        # 45 and 90 min at 1.5 h
TRAINING_COST = 3  # a training step (forward + backward) costs about 3 forward passes
# A single training plans PLAN_SLACK times the epochs its timed first epoch says fit; its deadline moves the schedule's
# end to what fits. Planned at 1.0, the default arm's first epoch of 116 s (tracing in it) planned 29 epochs of
# the 100-111 s they took, and it ended 6.6 of 60 minutes early (2026-12-05, AVX-512).
PLOT_NAME = "search_benchmark.png"
NOISE_NOTE = ("one run per arm, back to back on a shared machine: differences of a few points are noise; "
              "the machine's matmul rate measured before each arm is in the table")


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="python -m search.bench search", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=sorted(REFERENCE))
    p.add_argument("--budget", type=float, help="wall-clock seconds per arm (default: 3600 CIFAR-10, 5400 dogs)")
    p.add_argument("--data-dir", help="local copy of the data, as for search.run")
    p.add_argument("--subset", type=int, help="at most this many images per split (default: every image)")
    p.add_argument("--image-size", type=int, help="pixels per side (default: the space's)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run, of {', '.join(ARMS)}")
    p.add_argument("--out", help="curves, table, plot and stores (default: mlruns/bench-search/<dataset>)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")
    args.budget = args.budget or DEFAULT_BUDGET[args.dataset]
    args.out = Path(args.out or f"mlruns/bench-search/{args.dataset}").expanduser()
    return args


def main(argv: list[str]) -> int:
    """Run the chosen arms back to back, then print the table and draw the plot from every saved arm."""
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    logging.getLogger("search").setLevel(logging.INFO)  # a line per epoch and per trial while arms run
    for noisy in ("tensorflow", "mlflow"):  # retracing notices, model registration chatter
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from search.errors import ConfigError

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {cpu_count()} cores, AVX-512 {'yes' if has_avx512() else 'no'}, "
          f"{matmul_gflops():.0f} GFLOP/s float32 matmul", flush=True)
    failed = []
    try:
        check_single_arms(args)  # before any arm runs: a bad configuration must not surface after an hour
        for arm in args.arms:
            try:
                run_arm(arm, args)
            except ConfigError:
                raise
            except Exception as err:  # one arm failing keeps the others' hours of work
                logging.getLogger("search").exception(f"arm {arm} failed")
                failed.append(f"{arm} ({type(err).__name__}: {err})")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    arms = saved_arms(args.out)
    if not arms:
        print(f"no arm saved under {args.out}", file=sys.stderr)
        return 1
    print()
    print(table_text(arms, args.dataset))
    print(f"plot: {plot(arms, args.dataset, args.out / PLOT_NAME)}")
    if failed:
        print(f"failed arms (their earlier curves, if any, are shown): {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def check_single_arms(args: argparse.Namespace) -> None:
    """The baseline and reference configurations exist in the space (ConfigError otherwise)."""
    from search import space as spaces

    space = spaces.load_space("scratch_cnn", args.dataset)
    for arm in args.arms:
        if arm not in SEARCH_ARMS:
            single_arm_params(arm, space, args)


# ---------------------------------------------------------------- arms


def run_arm(arm: str, args: argparse.Namespace) -> None:
    """Run one arm for the budget and save its curve and facts under --out."""
    rate = matmul_gflops()
    print(f"\n== {arm}: {DESCRIPTIONS[arm]}, {args.dataset}, budget {args.budget:.0f} s; machine now "
          f"{rate:.0f} GFLOP/s float32 matmul", flush=True)
    started = time.perf_counter()
    curve, facts = (run_search_arm if arm in SEARCH_ARMS else run_single_arm)(arm, args)
    facts.update(arm=arm, description=DESCRIPTIONS[arm], dataset=args.dataset, budget=args.budget,
                 subset=args.subset, image_size=args.image_size, machine_gflops=rate,
                 wall_seconds=time.perf_counter() - started, finished=datetime.now().isoformat(timespec="seconds"),
                 cpu=cpu_name(), cores=cpu_count())
    save_arm(args.out, arm, curve, facts)
    last = curve[-1] if curve else None
    print(f"== {arm} done in {facts['wall_seconds']:.0f} s: "
          + (f"best val {last[1]:.4f}, its test {last[2]:.4f}" if last else "no completed model")
          + f"; trains at {fmt(facts.get('images_per_second'), '.0f')} images/s, "
            f"{fmt(facts.get('train_gflops'), '.1f')} GFLOP/s", flush=True)


def run_search_arm(arm: str, args: argparse.Namespace) -> tuple[list, dict]:
    """A study under the time budget, no trial cap; its curve from the trials in completion order."""
    from search.config import SearchConfig
    from search.drivers import run_search
    from search.stores import find_study

    stores = args.out / "stores"
    name = f"bench-search-{arm}-{datetime.now():%Y%m%d-%H%M%S}"  # a fresh study per run: reruns never mix
    config = SearchConfig(space="scratch_cnn", dataset=args.dataset, data_dir=args.data_dir,
                          subset=args.subset or 0, image_size=args.image_size, timeout=args.budget,
                          trials=10_000, workdir=str(stores), study_name=name, **SEARCH_ARMS[arm])
    summary = run_search(config)
    while summary.stopped == "memory":  # `search.run` replaces its process here; the benchmark's goes on
        summary = run_search(replace(config, budget_started=summary.budget_started))
    study = find_study(name, workdir=str(stores))
    curve = study_curve(study.trials, ensemble_runs(name, stores))
    facts = {"study": name, "trials": len(study.trials),
             "complete": sum(t.state.name == "COMPLETE" for t in study.trials),
             "pruned": sum(t.state.name == "PRUNED" for t in study.trials)}
    refits = [t for t in study.trials if t.user_attrs.get("refit_of") is not None]
    if refits:  # the refit phase's trials (one per round): which explored trial they retrained, how long
        facts.update(refit_trial=refits[-1].number, refit_of=refits[-1].user_attrs["refit_of"],
                     refit_epochs=[t.user_attrs.get("epochs") for t in refits],
                     refit_state=[t.state.name for t in refits])
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        best = max(complete, key=lambda t: t.value)
        facts.update(best_trial=best.number, params=best.params)
        facts.update(search_training_rate(best, args, stores / "models" / name / f"trial-{best.number}.keras"))
    return curve, facts


def study_curve(trials, ensembles=()) -> list[tuple[float, float, float]]:
    """(seconds since the first trial started, best val so far, test accuracy of that model: NaN for a screen) per
    completed trial and per ensemble built (`ensembles`: its end, val and test, from ensemble_runs), in time order."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    if not starts:
        return []
    origin = min(starts)
    # a screen (an explored trial of a run that refits) answered no test split: its point has no test figure
    events = [((t.datetime_complete - origin).total_seconds(), float(t.value),
               float(t.user_attrs.get("test_accuracy") if t.user_attrs.get("test_accuracy") is not None else math.nan))
              for t in trials if t.state.name == "COMPLETE" and t.datetime_complete]
    events += [((ended - origin).total_seconds(), val, test) for ended, val, test in ensembles]
    curve, best = [], None
    for seconds, val, test in sorted(events, key=lambda e: e[0]):
        if best is None or val > best[0]:
            best = (val, test)
        curve.append((seconds, *best))
    return curve


def ensemble_runs(study: str, stores: Path) -> list[tuple[datetime, float, float]]:
    """(end, val, test) of each ensemble the study built and registered (search/ensemble.py; a worker restarted
    for memory builds one when it stops, the run's end another), from its MLflow store."""
    from mlflow import MlflowClient

    from search.stores import tracking_uri
    from search.tracking import ROLE

    client = MlflowClient(tracking_uri(None, stores))
    found = client.get_experiment_by_name(study)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{ROLE}` = 'ensemble'") if found else []
    return [(datetime.fromtimestamp(r.info.end_time / 1000),  # Optuna's times are local and naive, as this
             r.data.metrics["val_accuracy"], r.data.metrics["test_accuracy"]) for r in runs if r.info.end_time]


def search_training_rate(best, args: argparse.Namespace, model_path: Path) -> dict:
    """The best trial's images/s and GFLOP/s over its fit (validation included), from its kept model."""
    import keras

    from runners.datasets import load_dataset

    from search import space as spaces

    size = (args.image_size or best.params.get("image_size")
            or spaces.default_params(spaces.load_space("scratch_cnn", args.dataset))["image_size"])
    data = load_dataset(args.dataset, data_dir=args.data_dir, image_size=size, subset=args.subset or None,
                        workdir=args.out / "stores")
    flops = forward_flops(keras.saving.load_model(model_path, compile=False)) if model_path.is_file() else None
    epochs = best.user_attrs.get("epochs_run") or len(best.intermediate_values)  # a refit reports no epochs to Optuna
    return training_rate(data.sizes(), epochs, best.user_attrs.get("train_seconds"), flops)


def run_single_arm(arm: str, args: argparse.Namespace) -> tuple[list, dict]:
    """One configuration trained once for the budget: a timed first epoch sets the epoch count."""
    from runners import scratch_cnn
    from runners.datasets import load_dataset
    from runners.callbacks import Deadline
    from runners.train import release
    from search import space as spaces

    space = spaces.load_space("scratch_cnn", args.dataset)
    name, params = single_arm_params(arm, space, args)
    print(f"   configuration {name}: {json.dumps(params, default=str)}", flush=True)
    data = load_dataset(args.dataset, data_dir=args.data_dir, image_size=params["image_size"],
                        subset=args.subset or None, workdir=args.out / "stores")
    options = {"architectures": space.architectures, "workdir": str(args.out / "stores"),
               "data_dir": args.data_dir}
    tracker = best_so_far(arm, data, params, time.perf_counter(), args.budget)

    def train(epochs: int, deadline: float | None = None):
        stop = [Deadline(deadline)] if deadline else []  # after the tracker: its test passes count in an epoch
        return scratch_cnn.train_and_evaluate(params, data, epochs=epochs, patience=epochs, seed=0,
                                              recipes=space.recipes, callbacks=[tracker] + stop, evaluate_test=False,
                                              options=options)

    tracker.epochs = 1
    release(train(1))  # the timed first epoch: building, tracing, one epoch, validation and a test pass
    first = time.perf_counter() - tracker.started
    epoch_seconds = tracker.epoch_seconds[0] + tracker.test_seconds  # an epoch whose model improves
    setup_seconds = max(0.0, first - epoch_seconds)                   # building and compiling, paid again
    remaining = args.budget - first
    epochs = max(1, int((remaining - setup_seconds) / epoch_seconds * PLAN_SLACK))
    print(f"   first epoch took {first:.1f} s ({epoch_seconds:.1f} s training, validation and test, "
          f"{setup_seconds:.1f} s building): planning {epochs} epochs for the remaining {max(remaining, 0):.0f} s; "
          "the deadline ends the schedule with the last one that fits", flush=True)
    tracker.epochs, tracker.test_seconds = epochs, 0.0
    result = train(epochs, deadline=time.time() + args.budget - (time.perf_counter() - tracker.started))
    facts = {"configuration": name, "params": params, "epochs": epochs, "epochs_run": 1 + result.epochs_run,
             "first_epoch_seconds": epoch_seconds,
             "param_count": result.param_count}
    facts.update(training_rate(data.sizes(), result.epochs_run, result.fit_seconds - tracker.test_seconds,
                               forward_flops(result.model)))
    release(result)
    return tracker.curve, facts


def single_arm_params(arm: str, space, args: argparse.Namespace) -> tuple[str, dict]:
    """(name, complete params) of the baseline or the reference, checked against the space."""
    from search import space as spaces
    from search.errors import ConfigError

    if arm == "default":
        name, params = f"the space's default ({args.dataset})", spaces.default_params(space)
        return name, params | ({"image_size": args.image_size} if args.image_size else {})
    if arm == "baseline":
        trials = spaces.baseline_trials(space)
        if not trials:
            raise ConfigError(f"space '{space.name}' has no baseline for {args.dataset}")
        name, params = trials[0]
        params = dict(params)
    else:
        name, wanted = f"reference ({args.dataset})", REFERENCE[args.dataset]
        problems = [f"{key}={value!r}" for key, value in wanted.items()
                    if key != "architecture" and (key not in space.params or not spaces.is_valid(space.params[key], value))]
        if wanted["architecture"] not in space.architectures:
            problems.append(f"architecture={wanted['architecture']!r} (not among the space's architectures)")
        if problems:
            raise ConfigError(f"space '{space.name}' cannot express the reference CNN: {', '.join(problems)}")
        params = spaces.complete_params(space, {**spaces.default_params(space), **wanted})
        params.update(wanted)  # the reference is exactly what it says, even where a parameter is inactive
    if args.image_size:
        params["image_size"] = args.image_size
    return name, params


def best_so_far(arm: str, data, params: dict, started: float, budget: float):
    """A Keras callback: after each epoch, if validation improved, the test accuracy of this model; one curve row
    (seconds since `started`, best val so far, its test accuracy) per epoch in `.curve`."""
    import keras

    from runners.train import evaluate

    class BestSoFar(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started, self.epochs, self.best_val, self.test = started, 1, -1.0, math.nan
            self.curve: list[tuple[float, float, float]] = []
            self.test_seconds = 0.0  # spent on test passes, not training
            self.epoch_seconds: list[float] = []  # each epoch's training and validation (runners.callbacks.EpochClock)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            val = float(logs.get("val_accuracy", math.nan))
            self.epoch_seconds.append(float(logs.get("epoch_seconds", time.perf_counter() - self.started)))
            if val > self.best_val:
                begun = time.perf_counter()
                self.test = evaluate(self.model, data, params)[0]["test_accuracy"]  # read as a trial's test
                self.test_seconds += time.perf_counter() - begun
                self.best_val = val
            elapsed = time.perf_counter() - self.started
            self.curve.append((elapsed, self.best_val, self.test))
            print(f"   [{arm}] epoch {epoch + 1}/{self.epochs} at {elapsed:.0f} s of {budget:.0f}: val {val:.4f}, "
                  f"best val {self.best_val:.4f} (its test {self.test:.4f})", flush=True)

    return BestSoFar()


# ---------------------------------------------------------------- rates


def training_rate(sizes: dict, epochs: int, fit_seconds: float | None, flops: float | None) -> dict:
    """images/s of training and GFLOP/s (training = 3 forward passes, each epoch's validation counted)."""
    if not fit_seconds or not epochs:
        return {}
    images = sizes["train"] * epochs
    rate = {"images_per_second": images / fit_seconds, "train_images": sizes["train"], "epochs_run": epochs,
            "fit_seconds": fit_seconds}
    if flops:
        work = epochs * (sizes["train"] * TRAINING_COST + sizes["val"]) * flops
        rate.update(forward_mflops_per_image=flops / 1e6, train_gflops=work / fit_seconds / 1e9)
    return rate


# ---------------------------------------------------------------- saving, table, plot


def save_arm(out: Path, arm: str, curve: list, facts: dict) -> None:
    """<out>/<arm>.csv (the curve) and <out>/<arm>.json (what ran, where, how fast)."""
    with open(out / f"{arm}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["elapsed_seconds", "best_val_accuracy", "test_accuracy"])
        writer.writerows([f"{e:.1f}", f"{v:.4f}", f"{t:.4f}"] for e, v, t in curve)
    (out / f"{arm}.json").write_text(json.dumps(facts, indent=2, default=str))


def saved_arms(out: Path) -> dict[str, dict]:
    """Every arm saved under out, in the arms' order: {arm: {"curve": [...], "facts": {...}}}."""
    arms = {}
    for arm in ARMS:
        path = out / f"{arm}.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            curve = [(float(r["elapsed_seconds"]), float(r["best_val_accuracy"]), float(r["test_accuracy"]))
                     for r in csv.DictReader(f)]
        meta = out / f"{arm}.json"
        arms[arm] = {"curve": curve, "facts": json.loads(meta.read_text()) if meta.is_file() else {}}
    return arms


def checkpoints(budget: float, dataset: str) -> list[float]:
    """Seconds at which the table reads each curve: 10, 20, 30, 45, 60 min of a CIFAR-10 hour, 45 and 90 min of
    the dogs' 1.5 h, the same fractions of any other budget."""
    return [budget * f for f in CHECKPOINTS.get(dataset, CHECKPOINTS["cifar10"])]


def value_at(curve: list, seconds: float) -> float | None:
    """Test accuracy of the best-by-validation model at a time (None before the first model, or while it is a
    screen, which answered no test split)."""
    before = [row for row in curve if row[0] <= seconds]
    return before[-1][2] if before and not math.isnan(before[-1][2]) else None


def table_text(arms: dict[str, dict], dataset: str) -> str:
    """The table: test accuracy at each checkpoint, best val, training rates, machine rate before the arm."""
    budgets = sorted({a["facts"].get("budget") for a in arms.values() if a["facts"].get("budget")})
    budget = max(budgets) if budgets else max(row[0] for a in arms.values() for row in a["curve"] or [(1, 0, 0)])
    marks = checkpoints(budget, dataset)
    header = ["arm"] + [f"test @ {minutes(s)}" for s in marks] + ["best val", "images/s", "train GFLOP/s",
                                                                 "matmul GFLOP/s"]
    rows = []
    for arm, saved in arms.items():
        facts, curve = saved["facts"], saved["curve"]
        arm_budget = facts.get("budget") or budget
        cells = [arm]
        for s in marks:
            value = value_at(curve, s) if s <= arm_budget * 1.001 else None
            cells.append(fmt(value, ".4f"))
        cells += [fmt(curve[-1][1] if curve else None, ".4f"), fmt(facts.get("images_per_second"), ".0f"),
                  fmt(facts.get("train_gflops"), ".1f"), fmt(facts.get("machine_gflops"), ".0f")]
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [f"{dataset}, budget {budget:.0f} s per arm: test accuracy of the model with the best validation "
             "accuracy so far (chosen by validation only)",
             line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    lines.append(f"note: {NOISE_NOTE}")
    if len(budgets) > 1:
        lines.append(f"note: the arms ran with different budgets ({', '.join(f'{b:.0f} s' for b in budgets)})")
    data = {json.dumps({k: a['facts'].get(k) for k in ('subset', 'image_size')}) for a in arms.values()}
    if len(data) > 1:
        lines.append(f"note: the arms ran on different data settings: {', '.join(sorted(data))}")
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    """'10 min', '67.5 min', '0.33 min'."""
    m = seconds / 60
    return f"{round(m, 2):g} min" if m < 1 else f"{m:.3g} min"


def fmt(value, spec: str) -> str:
    """A number formatted, or '-' for none."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def plot(arms: dict[str, dict], dataset: str, path: Path) -> Path:
    """Test accuracy (of the best-by-validation model so far) against wall-clock minutes, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, saved in arms.items():
        curve = saved["curve"]
        if curve:
            ax.step([r[0] / 60 for r in curve], [r[2] for r in curve], where="post", marker="o", markersize=3,
                    label=f"{arm}: {saved['facts'].get('description', DESCRIPTIONS[arm])}")
    budget = max((a["facts"].get("budget") or 0 for a in arms.values()), default=0)
    for s in checkpoints(budget, dataset) if budget else []:
        ax.axvline(s / 60, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("wall-clock minutes since the arm's first training")
    ax.set_ylabel("test accuracy (model chosen by validation)")
    ax.set_title(f"{dataset}: search against baselines (one run per arm, shared machine)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
