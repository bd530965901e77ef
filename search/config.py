"""Every setting of a search and every tuning constant, with its default and unit, in one place.

The command line is a thin layer over SearchConfig: a notebook builds `SearchConfig(space="scratch_cnn",
trials=5)` and calls `search.drivers.run_search` with it; `python -m search.run --space scratch_cnn --trials 5`
does exactly that. What a space searches (parameters, budget, fidelity) lives in its YAML file under spaces/.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SearchConfig:
    """What to search, on what data, how long, and where to record it (None = the space's budget)."""

    space: str = "scratch_cnn"             # shipped space name or path to a .yaml file
    dataset: str | None = None             # cifar10 | stanford_dogs | folder:PATH (None = the space's)
    data_dir: str | None = None            # local copy of the data (else caches, else download)
    trials: int | None = None              # study target of complete + pruned trials
    timeout: float | None = None           # seconds this invocation may run trials
    budget_started: float | None = None    # time.time() the --timeout began (None = now): a process restarted
                                           # for memory keeps the budget of the one it replaces
    refit: float | str = "auto"            # fraction of the timeout kept to retrain the best (auto: REFIT_AUTO with a timeout)
    epochs: int | None = None              # most epochs per trial
    subset: int | None = None              # at most this many images per split; 0 = all
    image_size: int | None = None          # overrides the space's image_size
    breeds: str | None = None              # N (first N breeds) or comma-separated names
    crop: bool = False                     # crop dogs to their Annotation/ boxes
    study_name: str | None = None          # default <space>-<dataset>
    storage: str | None = None             # Optuna: URL, or a file path for journal storage
    tracking_uri: str | None = None        # MLflow (else MLFLOW_TRACKING_URI, else sqlite under workdir)
    workdir: str = "mlruns"                # stores, caches, checkpoints, models, reports
    sampler: str = "tpe"                   # tpe | random | grid | cmaes
    pruner: str = "auto"                   # auto (hyperband with a time budget, else median) | median | hyperband | sha | none
    objectives: str = "val_accuracy"       # val_accuracy[,train_seconds|inference_ms|params]: several = Pareto search
    max_params: int | None = None          # constraint: models with more parameters are infeasible
    max_inference_ms: float | None = None  # constraint: models slower per image are infeasible
    seed: int = 0                          # study seed; trial t trains with seed*1000 + t
    max_failures: int = 5                  # failed trials in a row before the invocation stops
    keep_models: int | None = None         # models of the best K trials kept on disk (None: the space's
                                           # budget.keep_models, else KEEP_MODELS)
    warm_start: str | None = None          # STUDY[:K]: enqueue the K best configurations of STUDY
    workers: int = 1                       # processes sharing the study (journal storage by default)
    mixed_precision: bool | None = None    # None = on for GPUs that support it
    default_trial: bool = True             # a new study tries the space's defaults first
    baselines: bool = False                # the space's hand-made configurations go first (--baselines)
    backbone: str | None = None            # transfer: restrict the backbone choice (NAME[,NAME...])
    weights: str | None = None             # transfer: imagenet weights file, or "none" for random init
    study_patience: int | None = None      # stop after N completed trials without min_improvement
    min_improvement: float = 0.0           # the gain (val accuracy) that counts as improving
    within: float | None = None            # ... or stop after this many minutes without it
    max_memory_growth: float | None = None  # MB a worker may grow after its first trial before it restarts (None:
                                            # the space's budget.max_memory_growth, else MAX_MEMORY_GROWTH)
    driver: str = "optuna"                 # optuna | kerastuner
    tuner: str = "hyperband"               # kerastuner driver: hyperband | bayesian | random
    report: bool = field(default_factory=lambda: os.environ.get("SEARCH_REPORT", "1") != "0")
                                           # the study report at the end (HTML page, pictures); SEARCH_REPORT=0
                                           # turns it off by default, as scripts and tests running many studies do
    extra_tags: dict = field(default_factory=dict)

    def resolved_workdir(self) -> Path:
        """The workdir, created."""
        path = Path(self.workdir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path


# Every numeric setting's range, checked before anything is imported, opened or written (by the command line right
# after parsing, by search.drivers.run_search for a notebook's SearchConfig):
# flag -> (whole number?, lowest value, is the lowest value itself allowed?, what it means when it helps).
RANGES = {
    "trials": (True, 1, True, ""),
    "timeout": (False, 0, True, "seconds; 0 = no limit"),
    "epochs": (True, 1, True, ""),
    "subset": (True, 0, True, "images per split; 0 = all"),
    "image_size": (True, 8, True, "pixels: a smaller input leaves nothing for the convolutions"),
    "max_failures": (True, 1, True, ""),
    "keep_models": (True, 1, True, "the best trial's model is always kept"),
    "workers": (True, 1, True, ""),
    "seed": (True, 0, True, ""),
    "max_params": (True, 0, False, ""),
    "max_inference_ms": (False, 0, False, "milliseconds per test image"),
    "max_memory_growth": (False, 0, False, "MB"),
    "study_patience": (True, 1, True, "completed trials"),
    "within": (False, 0, False, "minutes"),
    "min_improvement": (False, 0, True, "validation accuracy, 0 = any gain"),
}


def range_problems(values: dict) -> list[str]:
    """What is out of range among the numeric settings (a parsed command line's or a SearchConfig's vars()),
    one message per flag, naming it: `--trials -1: give a whole number of at least 1`. None is "not given"."""
    problems = []
    for name, (whole, low, inclusive, note) in RANGES.items():
        value = values.get(name)
        if value is None:
            continue
        if whole:
            wanted = f"a whole number of at least {low if inclusive else low + 1}"
            bad = isinstance(value, bool) or int(value) != value or value < low or (value == low and not inclusive)
        else:
            wanted = f"a number {'of at least' if inclusive else 'above'} {low:g}"
            bad = not math.isfinite(value) or value < low or (value == low and not inclusive)
        if bad:
            flag = "--" + name.replace("_", "-")
            shown = f"{value:g}" if isinstance(value, float) else value
            problems.append(f"{flag} {shown}: give {wanted}" + (f" ({note})" if note else ""))
    name, colon, k = (values.get("warm_start") or "").partition(":")
    if (colon and not (k.isdigit() and int(k) >= 1)) or (values.get("warm_start") is not None and not name):
        problems.append(f"--warm-start {values['warm_start']}: give STUDY or STUDY:K, K a whole number of at "
                        "least 1 (the K best configurations of STUDY)")
    return problems


# What a study can optimise: the first is always validation accuracy; the others are costs to minimise,
# each read from a completed trial's metrics.
OBJECTIVES = {"val_accuracy": ("maximize", "best_val_accuracy"), "train_seconds": ("minimize", "train_seconds"),
              "inference_ms": ("minimize", "inference_ms"), "params": ("minimize", "param_count")}


# ---------------------------------------------------------------- tuning constants, with their units and why

# The refit phase (search/refit.py): retrain the best explored configuration for the rest of the budget.
REFIT_AUTO = 0.8          # fraction of --timeout kept for the refit by `--refit auto` (with a timeout and one
                          # objective): two measured hours on CIFAR-10 found nothing better than the space's
                          # default in 30 min of exploration, while every refit epoch gained (10 epochs: +5.6
                          # points over its 4-epoch trial); at 0.8 a measured hour refit fast_cifar for 7 + 14
                          # epochs (two rounds): 89.1% test
REFIT_MAX = 0.9           # largest --refit fraction: beyond it too little time is left to explore
REFIT_ROUND_END = 0.5     # fraction of --timeout: a refit that starts before it finishes a first round by then
                          # (a finished model at half the budget), then a warm restart from it fills the rest
REFIT_EPOCH_MARGIN = 1.05  # the refit plans its epochs 5% slower than measured: epochs of one model varied 107-146 s
PLAN_SLACK = 1.25         # a refit (and the benchmark's single trainings) schedule 25% more epochs than planned: the
                          # Deadline moves the schedule's end to the last epoch that fits, so planning long costs
                          # nothing, while planning short left time unused (a refit of 24 epochs planned from timed
                          # steps at 19 s each, whose epochs took 16-17 s, ended 30 s early; at 1.15 the default arm
                          # of the 10-minute benchmark ran all 26 epochs it scheduled and ended 47 s early)
REFIT_MIN_EPOCHS = 10     # `max_mflops: auto` refuses models whose refit could not train this many epochs, and a default
                          # that could not is narrowed to a `width` that can (search/plan.py: fit_default_to_machine):
                          # the refit of fast_cifar gained at every epoch up to 21 (89.1% test), and a model that
                          # gets a handful of epochs stays far below it
MAX_MFLOPS_UNMEASURED = 300  # `max_mflops: auto` in a run that measured nothing (no time budget): MFLOP per image
                             # that keep an epoch of 45,000 CIFAR-10 images within ~2 min on 2 AVX-512 cores

# Exploration's fidelity (search/plan.py): with `fidelity.train_subset: auto` a time-budgeted run trains explored
# trials on a subset of the training images per epoch, sized from the measured speed.
EXPLORED_TRIALS_WANTED = 12  # first-rung trials exploration's share should hold: TPE learns little from fewer
MIN_EXPLORED_TRIALS = 4      # first-rung trials of the default that must fit in exploration's share, else the run trains
                             # the default for the whole budget (search/plan.py): on a 2-core AVX2 CPU (100 images/s) the
                             # README command's 120 s held one trial, the default itself, and the refit then had 2 minutes
                             # less for the same configuration
TRAIN_SUBSET_FLOOR = 0.5     # never fewer than this share of the training images: at a tenth of the default's
                             # 6,000 CIFAR images (3 steps of 256 an epoch) exploration ranked a small MSE model
                             # first and its refit reached 65.6% test against 76.4% explored on every image (one run each)
VAL_SUBSET_RATIO = 0.5       # `fidelity.val_subset: auto`: an explored trial validates on at most half as many images as it
                             # trains on per epoch (validation then costs at most a seventh of its epoch: a forward pass
                             # is a third of a training step). At 3,000 training images an epoch, validating on all 4,982
                             # was over a third of every explored epoch
VAL_SUBSET_FLOOR = 2000      # ... and on at least this many (images): near 50% accuracy the standard error stays ~1 point,
                             # well below the gaps between configurations after a few epochs

# Samplers and pruners (search/sampling.py).
TPE_STARTUP = (3, 10, 3)  # TPE's start-up trials: target // 3, at least 3 and at most 10 (trials); in a new study of
                          # a space with `start: near_default` these are the default and perturbations of it
BAYESIAN_STARTUP = (2, 10, 3)  # Keras Tuner's Gaussian process: random points first, target // 3 in 2..10 (trials)
NEAR_DEFAULT_CHANGES = 2  # a perturbation of the default changes this many of its parameters (drawn at random) ...
NEAR_DEFAULT_SPREAD = 0.15  # ... a number by a normal step of this share of its range (of its log range for log-scaled
                            # ones), a choice to another at random. On the dogs, 20 of the random arm's 27 trials
                            # stayed at chance (wide draws of loss and learning rate); on CIFAR-10 a perturbation that
                            # moved 6 parameters at once (augmentation off among them) won at 4 epochs on 3,000
                            # images and overfitted in its refit (69.4% test against 77.3%), so few move at once
MEDIAN_STARTUP_TRIALS = 3  # the median pruner prunes nothing until this many trials have finished (trials)
MEDIAN_WARMUP_EPOCHS = 1   # ... nor before a trial's second epoch (epochs)
HYPERBAND_FACTOR = 3       # Hyperband's reduction factor when the space's `fidelity` does not give one: a third of
                           # the trials go on at each rung (Optuna's and Keras Tuner's default)
COST_STEPS_PER_EPOCH = 10  # `fidelity.resource: cost` (search/fidelity.py): a pruning step is a tenth of one epoch of
                           # the default's work (images x forward MFLOP), fine enough to price a model 10x cheaper
COST_MAX_EPOCHS_FACTOR = 4  # ... and a cheap model trains at most 4x the space's epochs per trial: each epoch also
                            # pays a validation pass and Keras's per-epoch overhead, which the work count leaves out
HEARTBEAT_SECONDS = 30     # server databases: a worker beats this often; three missed beats declare its trial dead
                           # and Optuna retries it (SEARCH_HEARTBEAT_SECONDS overrides it, tests shorten it)
HEARTBEAT_RETRIES = 2      # how often a dead worker's trial is retried
WARM_START_TRIALS = 5      # --warm-start STUDY without :K carries the K best configurations of STUDY
TARGET_WAIT_SECONDS = 2    # a trial that may be surplus (workers racing for the last trials) looks again this often

# MLflow (search/tracking.py).
SYSTEM_METRICS_SECONDS = 10  # a sample of CPU, memory, disk and network per trial run every 10 s: nothing a
                             # trial would notice, and a 30 s trial still gets its figures

MAX_MEMORY_GROWTH = 400   # MB a worker may grow after its first trial before it restarts (a space may say more:
                          # a transfer study loads one feature cache per backbone, ~250 MB each for the dogs)

# Kept models and the ensemble (search/trial.py, search/ensemble.py).
KEEP_MODELS = 3            # models of the best K trials kept on disk unless the space or --keep-models says otherwise
ENSEMBLE_ROUNDS = 20       # greedy forward selection (Caruana et al. 2004) adds one member per round, with
                           # replacement, for at most this many rounds; the best round's ensemble is the one kept

# Data (search/setup.py).
DATA_SIZES_KEPT = 2        # image sizes a study keeps loaded at once: a dogs study at 3 sizes held 3 copies (GB)
