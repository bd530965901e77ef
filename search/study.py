"""The Optuna driver: set a study up, run its trials through the runner, record each in MLflow.

`run_search(config)` reads and checks everything first (space, data, stores): any problem there is a
ConfigError before the first trial. Then each trial: Optuna suggests parameters, `runners.train` fits and
evaluates, `search.tracking` logs, and the trial ends COMPLETE, PRUNED or FAIL in both stores alike.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from search import space as spaces
from search import tracking
from search.config import (OBJECTIVES, SearchConfig, artifact_root, default_optuna_stores, optuna_storage_url,
                           tracking_uri)
from search.errors import ConfigError
from search.stopping import MemoryWatch, StudyPatience

log = logging.getLogger("search")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchAborted(RuntimeError):
    """Too many trials failed in a row; the message names the last reason."""


class SurplusTrial(RuntimeError):
    """A trial claimed after the study reached its target (a race between workers)."""


@dataclass
class SearchSummary:
    """What one invocation did, for the caller and the final printout."""

    study_name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    trials_run: int = 0
    counted: int = 0
    target: int = 0
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_trial: int | None = None
    stopped: str = "target"
    stop_details: dict = field(default_factory=dict)
    budget_started: float | None = None  # time.time() the time budget began (SearchConfig.budget_started)


# ---------------------------------------------------------------- stores


def open_storage(url: str):
    """Optuna storage from a URL (SQLite, PostgreSQL, ...) or a file path (journal storage)."""
    try:
        if "://" not in url:
            from optuna.storages.journal import JournalFileBackend

            Path(url).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        # a server database can outlive a worker: heartbeats find trials whose worker died, and retry them
        # (a worker's trial is declared dead after three missed beats; tests shorten the beat)
        beat = int(os.environ.get("SEARCH_HEARTBEAT_SECONDS", "30"))
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=beat, grace_period=3 * beat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    except ImportError as err:
        raise ConfigError(f"Optuna storage {tracking.redact(url)} needs a database driver: {err}. "
                          "For PostgreSQL: pip install 'dogsearch[postgres]'.") from None
    except Exception as err:
        raise ConfigError(f"Optuna storage {tracking.redact(url)} cannot be opened: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300]}. Check --storage.") from None


def find_study(name: str, storage: str | None = None, workdir: str = "mlruns") -> optuna.Study:
    """A study by name in the given storage, else in either default store; ConfigError lists what exists."""
    urls = [storage] if storage else default_optuna_stores(workdir)
    known: list[str] = []
    for url in urls:
        store = open_storage(url)
        names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
        if name in names:
            return optuna.load_study(study_name=name, storage=store)
        known += names
    where = ", ".join(tracking.redact(u) for u in urls) or f"{workdir}/ (no Optuna store there yet)"
    raise ConfigError(f"no study named '{name}' in {where}. Known studies: {', '.join(sorted(known)) or 'none'}.")


def make_sampler(name: str, seed: int, space: spaces.Space, target: int) -> optuna.samplers.BaseSampler:
    """tpe | random | grid | cmaes, seeded (TPE reads the constraints trials set, see `finished`)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, target // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(spaces.grid_of(space), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError(f"unknown sampler '{name}'; available: tpe, random, grid, cmaes")


def sampler_seed(seed: int, trials_so_far: int, shared: bool) -> int:
    """The sampler's seed for this process: --seed on a fresh study run by one process; otherwise one mixed
    from it, the trials already in the study and this process, so a resumed, restarted or parallel worker
    does not replay the suggestions (random ones, TPE's start-up ones) the study has already tried."""
    if not trials_so_far and not shared:
        return seed
    parts = [seed, trials_so_far] + ([os.getpid(), zlib.crc32(socket.gethostname().encode())] if shared else [])
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def trials_in(storage, study_name: str) -> int:
    """Trials the study already holds in a storage, 0 when it does not exist yet."""
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(study_name))
    except KeyError:
        return 0


def make_pruner(name: str, epochs: int, min_epochs: int = 1, factor: int = 3) -> optuna.pruners.BasePruner:
    """median | hyperband | sha | none, over epochs as the resource (the space's `fidelity`)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max(epochs, min_epochs),
                                              reduction_factor=factor)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=factor)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'; available: auto, median, hyperband, sha, none")


def pruner_name(config: SearchConfig, timeout: float | None, objectives: list[str]) -> str:
    """The pruner a run uses: `auto` is Hyperband when time is the budget (most trials stop after a few cheap
    epochs, the promising ones train long), else median; a multi-objective study cannot prune (Optuna)."""
    if len(objectives) > 1:
        if config.pruner not in ("auto", "none"):
            raise ConfigError(f"--pruner {config.pruner}: Optuna cannot prune a multi-objective study "
                              f"(--objectives {','.join(objectives)}); leave --pruner out")
        return "none"
    if config.pruner == "auto":
        return "hyperband" if timeout else "median"
    return config.pruner


REFIT_AUTO = 0.8   # of the timeout: two measured hours on CIFAR-10 found nothing better than the space's default in
                   # 30 min of exploration, while every refit epoch gained (10 epochs: +5.6 points over its 4-epoch trial);
                   # at 0.8 a measured hour refit fast_cifar for 7 + 14 epochs (two rounds, below): 89.1% test
REFIT_ROUND_END = 0.5  # a refit that starts before this fraction of the timeout finishes a first round by then
                       # (a finished model at half the budget), then a warm restart from it fills the rest
REFIT_EPOCH_MARGIN = 1.05  # the refit plans its epochs 5% slower than measured: epochs of one model varied 107-146 s
REFIT_MAX = 0.9    # beyond this too little time is left to explore before the refit


def refit_fraction(config: SearchConfig, timeout: float | None, objectives: list[str]) -> float:
    """The fraction of --timeout kept for the refit: `auto` is 0.8 when time is the budget and the study has one
    objective (there is then one best configuration to retrain), else 0; a bad fraction is a ConfigError."""
    if str(config.refit).strip().lower() == "auto":
        return REFIT_AUTO if timeout and len(objectives) == 1 else 0.0
    try:
        fraction = float(config.refit)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0 <= fraction <= REFIT_MAX:  # NaN fails too
        raise ConfigError(f"--refit {config.refit}: give a fraction of --timeout between 0 and {REFIT_MAX} "
                          "(0 = no refit), or auto")
    if fraction and len(objectives) > 1:
        raise ConfigError(f"--refit {config.refit}: a multi-objective study (--objectives {config.objectives}) has a "
                          "Pareto front, not one best configuration to retrain; leave --refit out or give 0")
    return fraction


def parse_objectives(text: str) -> list[str]:
    """--objectives as a list starting with val_accuracy; unknown names list the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or names[0] != "val_accuracy" or len(set(names)) != len(names):
        raise ConfigError(f"--objectives {text}: give val_accuracy first, then any of "
                          f"{', '.join(n for n in OBJECTIVES if n != 'val_accuracy')} (each once)")
    return names


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial meets --max-params and --max-inference-ms (or there are none)."""
    return all(v <= 0 for v in trial.constraints.values())


def constraint_values(config: SearchConfig, metrics: dict) -> dict[str, float]:
    """How far a model is over each limit the run set (<= 0: within it), by the option's name."""
    values = {}
    if config.max_params:
        values["max_params"] = float(metrics.get("param_count") or 0) - config.max_params
    if config.max_inference_ms:
        values["max_inference_ms"] = float(metrics.get("inference_ms") or 0) - config.max_inference_ms
    return values


# ---------------------------------------------------------------- set-up


@dataclass
class RunSetup:
    """What every driver (Optuna here, Keras Tuner in search.kerastuner_driver) settles before its first trial."""

    config: SearchConfig
    space: spaces.Space
    dataset: str
    target: int
    timeout: float | None
    epochs: int
    patience: int
    subset: int | None
    client: object
    experiment_id: str
    tracking_uri: str
    data_cache: dict = field(default_factory=dict)  # loaded datasets by image size, shared by the trials


@dataclass(kw_only=True)
class Setup(RunSetup):
    """Everything checked before the first trial: the run's set-up and its Optuna study."""

    study: optuna.Study
    storage_url: str
    refit: float = 0.0  # fraction of the timeout kept for the refit phase
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))


def prepare(config: SearchConfig) -> Setup:
    """Read the space, find the data, open both stores: every configuration error surfaces here."""
    return as_config_error(_prepare, config)


def as_config_error(build, config: SearchConfig):
    """Run a driver's set-up, turning missing files and bad values into ConfigError (exit 2)."""
    try:
        return build(config)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(str(err).strip("'\"")) from None


@dataclass
class Budget:
    """The space's budget after the command line's overrides (0 means none for timeout and subset)."""

    trials: int
    epochs: int
    timeout: float | None
    subset: int | None
    patience: int


def resolve_space(config: SearchConfig) -> tuple[str, spaces.Space, Budget]:
    """The dataset, the checked space for it (with --image-size applied) and the budget: for every driver."""
    dataset = config.dataset or spaces.load_space(config.space).dataset
    space = spaces.load_space(config.space, dataset)
    b = space.budget
    budget = Budget(trials=config.trials or b["trials"], epochs=config.epochs or b["epochs"],
                    timeout=b["timeout"] if config.timeout is None else (config.timeout or None),
                    subset=b["subset"] if config.subset is None else (config.subset or None),
                    patience=b["patience"])
    if config.image_size:
        space.params["image_size"] = spaces.Param("image_size", "fixed", value=config.image_size,
                                                  default=config.image_size)
    return dataset, space, budget


def _prepare(config: SearchConfig) -> Setup:
    workdir = config.resolved_workdir()
    dataset, space, budget = resolve_space(config)
    target, epochs, timeout, subset = budget.trials, budget.epochs, budget.timeout, budget.subset
    objectives = parse_objectives(config.objectives)
    refit = refit_fraction(config, timeout, objectives)
    runner = model_runner(space.model)
    if hasattr(runner, "prepare_space"):
        runner.prepare_space(space, config)  # transfer: --backbone narrows the choice, --weights is checked
    elif config.backbone or config.weights:
        raise ConfigError(f"--backbone and --weights apply to the transfer space; space '{space.name}' has no backbone")
    study_name = config.study_name or f"{space.name}-{dataset.split(':')[0]}"
    storage_url = optuna_storage_url(config)
    uri = tracking_uri(config.tracking_uri, workdir)
    setup_data = {}
    probe_data(config, dataset, space, subset, workdir, setup_data)
    storage = open_storage(storage_url)
    # a server or journal store may be shared by workers on other hosts even when this one runs alone
    shared = config.workers > 1 or not storage_url.startswith("sqlite:")
    seed = sampler_seed(config.seed, trials_in(storage, study_name), shared)
    fidelity = space.fidelity
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                directions=[OBJECTIVES[name][0] for name in objectives],
                                sampler=make_sampler(config.sampler, seed, space, target),
                                pruner=make_pruner(pruner_name(config, timeout, objectives), epochs,
                                                   fidelity.get("min_epochs", 1), fidelity.get("reduction_factor", 3)))
    if len(study.directions) != len(objectives):
        raise ConfigError(f"study {study_name} was created with {len(study.directions)} objective(s); "
                          f"--objectives {config.objectives} has {len(objectives)}. Use another --study-name.")
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, study_name, artifact_root(uri, workdir))
    return Setup(config, space, dataset, target, timeout, epochs, budget.patience, subset, client, exp_id, uri,
                 study=study, storage_url=storage_url, refit=refit, data_cache=setup_data)


def probe_data(config: SearchConfig, dataset: str, space: spaces.Space, subset, workdir: Path, cache: dict):
    """Load the data once at the space's default image size, so missing data stops the run before trials."""
    size = spaces.default_params(space).get("image_size", 32)
    cache[size] = load_data(config, dataset, size, subset, workdir)


def load_data(config: SearchConfig, dataset: str, image_size: int, subset, workdir: Path):
    """The runner's dataset at one image size, with bad files reported once."""
    from runners.datasets import load_dataset

    data = load_dataset(dataset, data_dir=config.data_dir, image_size=image_size, subset=subset,
                        breeds=parse_breeds(config.breeds), crop=config.crop, workdir=workdir)
    sizes = data.sizes()
    log.info(f"data: {data.name} at {image_size}px, {len(data.class_names)} classes, train {sizes['train']:,} / "
             f"val {sizes['val']:,} / test {sizes['test']:,} images ({data.source})")
    if data.bad_files:
        from runners.photos import bad_file_report

        log.warning(bad_file_report(data.bad_files, limit=10))
    return data


def parse_breeds(breeds: str | None):
    """'10' -> 10, 'Chihuahua,beagle' -> ['Chihuahua', 'beagle'], None -> None."""
    if not breeds:
        return None
    return int(breeds) if breeds.strip().isdigit() else [b.strip() for b in breeds.split(",") if b.strip()]


# ---------------------------------------------------------------- the run


def run_search(config: SearchConfig) -> SearchSummary:
    """Run trials until the study has `trials` complete or pruned ones (or time runs out)."""
    if config.driver == "kerastuner":
        from search.kerastuner_driver import run_kerastuner_search

        return run_kerastuner_search(config)
    setup = prepare(config)
    study, client = setup.study, setup.client
    from runners.device import configure_devices
    from search.environment import describe_environment

    environment = describe_environment(configure_devices(config.mixed_precision))
    recover_stale_trials(study, client, setup.experiment_id, checkpoints_of(setup), resume=count(study) < setup.target)
    parent = tracking.start_parent_run(client, setup.experiment_id, study.study_name,
                                       invocation_settings(setup), environment, setup.space.text,
                                       {"budget": setup.space.budget, "params": {k: asdict(v) for k, v in setup.space.params.items()}})
    summary = SearchSummary(study.study_name, tracking.redact(setup.storage_url), tracking.redact(setup.tracking_uri),
                            parent, target=setup.target)
    first_trials(setup)
    status = "FINISHED"
    try:
        optimize(setup, parent, environment, summary)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SearchAborted:
        status = "FAILED"
        raise
    finally:
        finish_invocation(setup, parent, summary, status)
    return summary


def invocation_settings(setup: Setup) -> dict:
    """What this invocation was asked to do, for the parent run's params."""
    c = setup.config
    return {"space": setup.space.name, "space_file": setup.space.source, "dataset": setup.dataset,
            "data_dir": c.data_dir, "trials_target": setup.target, "timeout": setup.timeout, "epochs": setup.epochs,
            "patience": setup.patience, "subset": setup.subset, "sampler": c.sampler,
            "pruner": pruner_name(c, setup.timeout, parse_objectives(c.objectives)), "objectives": c.objectives,
            "max_params": c.max_params, "max_inference_ms": c.max_inference_ms, "baselines": c.baselines,
            "seed": c.seed, "storage": tracking.redact(setup.storage_url), "breeds": c.breeds,
            "image_size": c.image_size, "workers": c.workers, "warm_start": c.warm_start, "refit": setup.refit}


def first_trials(setup: Setup) -> None:
    """Enqueue the hand-made baselines (--baselines), the space's defaults in a new study, a warm start's best."""
    study = setup.study
    new = not study.get_trials(deepcopy=False)
    if setup.config.baselines:
        enqueue_baselines(setup)
    if setup.config.default_trial and new:
        study.enqueue_trial(spaces.default_params(setup.space), user_attrs={"source": "default"})
    if setup.config.warm_start:
        enqueue_warm_start(setup)


def enqueue_baselines(setup: Setup) -> None:
    """The space's baselines for this dataset, best-known first, each once per study, tagged as baselines."""
    found = spaces.baseline_trials(setup.space)
    if not found:
        raise ConfigError(f"--baselines: space {setup.space.source} has no baselines for "
                          f"{setup.dataset.split(':')[0]} (add them under 'baselines:')")
    for label, params in found:
        searched = {k: v for k, v in params.items() if setup.space.params[k].type != "fixed"}
        setup.study.enqueue_trial(searched, user_attrs={"source": f"baseline:{label}", "baseline": label},
                                  skip_if_exists=True)
    log.info(f"baselines: enqueued {len(found)} hand-made configurations ahead of the search")


def enqueue_warm_start(setup: Setup) -> None:
    """The K best configurations of another study, kept to what is valid in this space and dataset."""
    name, _, k = setup.config.warm_start.partition(":")
    source = find_study(name, None, setup.config.workdir)
    done = sorted((t for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                  key=lambda t: t.values[0], reverse=True)[: int(k or 5)]
    source_dataset = source.user_attrs.get("dataset")
    for t in done:
        given = dict(t.params)
        if source_dataset != setup.dataset.split(":")[0]:
            given.pop("image_size", None)  # image and batch size never carry across datasets
            given.pop("batch_size", None)
        params = {k: v for k, v in spaces.complete_params(setup.space, given).items()
                  if setup.space.params[k].type != "fixed"}
        setup.study.enqueue_trial(params, user_attrs={"source": f"warm-start:{name}#{t.number}"},
                                  skip_if_exists=True)
    log.info(f"warm start: enqueued {len(done)} configurations from {name}")


def optimize(setup: Setup, parent: str, environment: dict, summary: SearchSummary) -> None:
    """study.optimize with the stopping rules of conventions.md: target count, time, failures in a row."""
    study = setup.study
    study.set_user_attr("dataset", setup.dataset.split(":")[0])
    study.set_user_attr("space", setup.space.name)
    study.set_user_attr("objectives", setup.config.objectives)
    done = count(study)
    if done >= setup.target:
        log.info(f"study {study.study_name} already has {done} of {setup.target} trials; raise --trials to add more")
        summary.counted = done
        return
    failures = FailureStreak(setup.config.max_failures)
    patience = StudyPatience(setup.config.study_patience, setup.config.min_improvement, setup.config.within)
    memory = MemoryWatch(setup.config.max_memory_growth)
    callbacks = [optuna.study.MaxTrialsCallback(setup.target, states=COUNTED), failures, patience, memory,
                 DiscardCheckpoint(checkpoints_of(setup))]
    objective = make_objective(setup, parent, environment, summary)
    started = time.monotonic()
    summary.budget_started = setup.config.budget_started or time.time()
    spent = max(0.0, time.time() - summary.budget_started)  # by the processes this one replaces
    explore = max(0.0, setup.timeout * (1 - setup.refit) - spent) if setup.timeout else None
    if explore != 0.0:
        study.optimize(objective, n_trials=None, timeout=explore, callbacks=callbacks,
                       catch=(Exception,))  # runners.train.release collects garbage once per trial
    summary.counted = count(study)
    if failures.tripped:
        summary.stopped = "failures"
        raise SearchAborted(f"{failures.limit} trials failed in a row; the last one: {failures.last_reason}")
    if memory.reason:
        summary.stopped = "memory"
        summary.stop_details = memory.figures
        log.info(f"stopped: {memory.reason}")
    elif patience.reason:
        summary.stopped = "patience"
        summary.stop_details = patience.figures
        log.info(f"stopped: {patience.reason}")
    elif summary.counted < setup.target:
        summary.stopped = "timeout"
        # the share, not what was left of it: a resumed run may have had none left
        budget = (f"exploration's {setup.timeout * (1 - setup.refit):.0f} s of the {setup.timeout:.0f} s budget"
                  if setup.refit
                  else f"time budget of {setup.timeout:.0f} s")
        log.info(f"{budget} reached after {summary.counted} of {setup.target} trials; "
                 "run the same command again to continue (--timeout 0 for no limit)")
    if setup.refit and not memory.reason:  # a process about to be replaced starts no long trial
        # at most its share: a run whose trials end early is not stretched to the whole --timeout
        elapsed = spent + (time.monotonic() - started)
        refit_best(setup, parent, objective, min(setup.timeout - elapsed, setup.timeout * setup.refit), elapsed)
        summary.counted = count(study)


# ---------------------------------------------------------------- the refit phase


def best_explored(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The explored (not refit) complete feasible trial with the best validation accuracy, or None."""
    explored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if feasible(t) and t.user_attrs.get("refit_of") is None]
    return max(explored, key=lambda t: t.values[0], default=None)


def refit_epoch_seconds(best: optuna.trial.FrozenTrial) -> float | None:
    """What one refit epoch of `best` is planned to take: its epochs' mean plus REFIT_EPOCH_MARGIN; None when
    `best` recorded no timings."""
    ran = best.user_attrs.get("epochs_run") or len(best.intermediate_values)
    per_epoch = best.user_attrs.get("epoch_seconds")
    if not per_epoch and best.user_attrs.get("train_seconds") and ran:  # trials recorded before epoch_seconds
        per_epoch = best.user_attrs["train_seconds"] / ran
    if not per_epoch or not ran:
        return None
    return per_epoch * REFIT_EPOCH_MARGIN  # so a slower stretch of a shared machine still ends inside the budget


def refit_plan(best: optuna.trial.FrozenTrial, remaining: float) -> tuple[int, float] | None:
    """(epochs, expected seconds) of a refit of `best` that fills `remaining` seconds, never fewer epochs than
    `best` ran; None when `best` recorded no timings.

    An epoch costs refit_epoch_seconds; building the model and the test pass cost what they cost `best` (its
    trial seconds beyond its training seconds), once."""
    per_epoch = refit_epoch_seconds(best)
    if per_epoch is None:
        return None
    ran = best.user_attrs.get("epochs_run") or len(best.intermediate_values)
    fixed = setup_seconds(best)
    epochs = max(ran, int((remaining - fixed) // per_epoch))
    return epochs, fixed + epochs * per_epoch


def one_epoch_seconds(best: optuna.trial.FrozenTrial) -> float:
    """What a refit of `best` that trains a single epoch is expected to take, set-up and test pass included."""
    return setup_seconds(best) + refit_epoch_seconds(best)


def one_epoch_fits(best: optuna.trial.FrozenTrial, remaining: float) -> bool:
    """Whether a refit of `best` can train at least one epoch in `remaining` seconds."""
    return one_epoch_seconds(best) <= remaining


def setup_seconds(trial: optuna.trial.FrozenTrial) -> float:
    """What a trial spent besides training: building its model and the test pass."""
    return max(0.0, (trial.user_attrs.get("trial_seconds") or 0.0) - (trial.user_attrs.get("train_seconds") or 0.0))


def refit_rounds(best: optuna.trial.FrozenTrial, timeout: float, elapsed: float, remaining: float) -> list[float]:
    """Seconds for each round of the refit: one round for the time left, or, when the refit starts before
    REFIT_ROUND_END of the timeout and `best`'s epochs fit twice, a first round that ends there and a second
    one (a warm restart from the first's weights) for the rest."""
    first = timeout * REFIT_ROUND_END - elapsed
    plan = refit_plan(best, first) if first > 0 else None
    if plan is None or plan[1] > first or remaining - first < first:
        return [remaining]
    return [first, remaining - first]


def refit_best(setup: Setup, parent: str, objective, remaining: float, elapsed: float = 0.0) -> None:
    """Train the best explored configuration once more, for the time exploration left, as one or two trials.

    Each round's epoch count (user attr `epochs`) makes its learning-rate schedule span its time; a second
    round starts from the first one's weights (user attr `continues`), as a warm restart does. Rounds go
    through the same objective as every trial (MLflow run, checkpoints, leaderboard, best model), unpruned."""
    study = setup.study
    best = best_explored(study)
    if best is None or remaining <= 0:
        log.info("refit: skipped, " + ("no complete trial to retrain" if best is None
                                       else f"exploration used the whole {setup.timeout:.0f} s"))
        return
    busy = (TrialState.WAITING, TrialState.RUNNING)
    if any(t.user_attrs.get("refit_of") == best.number for t in study.get_trials(deepcopy=False, states=busy)):
        log.info(f"refit: trial {best.number}'s configuration is already being refit by another worker")
        return
    if refit_plan(best, remaining) is None:
        log.info(f"refit: skipped, trial {best.number} recorded no epoch timings")
        return
    if not one_epoch_fits(best, remaining):  # its first epoch would end past the budget and teach nothing new
        log.info(f"refit: skipped, one epoch of trial {best.number}'s configuration (~{one_epoch_seconds(best):.0f} s) "
                 f"does not fit in the {remaining:.0f} s left")
        return
    started = time.monotonic()
    rounds = refit_rounds(best, setup.timeout, elapsed, remaining)
    previous = None
    for index in range(1, len(rounds) + 1):
        seconds = started + sum(rounds[:index]) - time.monotonic()  # to this round's end, as earlier ones ran
        if index > 1 and (previous is None or seconds <= 0 or refit_plan(best, seconds)[1] > seconds):
            log.info("refit: no second round, " + ("the first did not complete" if previous is None
                                                     else "too little time left for it"))
            return
        epochs, planned = refit_plan(best, seconds)
        label = f"round {index} of {len(rounds)}: " if len(rounds) > 1 else ""
        start = f", starting from trial {previous.number}'s weights" if index > 1 else ""
        log.info(f"refit: {label}trial {best.number}'s configuration for {epochs} epochs (~{planned:.0f} s){start}")
        tracking.set_tags(setup.client, parent, {"search.refit_of": best.number, "search.refit_epochs": epochs,
                                                 "search.refit_planned_seconds": round(planned),
                                                 "search.refit_rounds": len(rounds)})
        # training stops at the round's end less the test pass, however slow its epochs turn out (Deadline)
        attrs = {"source": "refit", "refit_of": best.number, "epochs": epochs, "refit_round": index,
                 "deadline": time.time() + seconds - setup_seconds(best)}
        if previous is not None:
            attrs.update(continues=previous.number, epochs_before=previous.user_attrs.get("epochs_run", 0)
                         + previous.user_attrs.get("epochs_before", 0))
        previous = run_refit_trial(setup, objective, best.params, attrs)


def run_refit_trial(setup: Setup, objective, params: dict, attrs: dict) -> optuna.trial.FrozenTrial | None:
    """Enqueue one refit trial, claim it, run it through the objective; the trial if it completed, else None."""
    study = setup.study
    study.enqueue_trial(params, user_attrs=attrs)
    queued = max((t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.user_attrs.get("refit_of") == attrs["refit_of"]), key=lambda t: t.number)
    if not study._storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
        log.info(f"refit: trial {queued.number} was taken by another worker")
        return None
    # Optuna runs the first waiting trial of the queue, which may be a baseline or warm start exploration left:
    # this one call runs the refit trial claimed above instead
    study._pop_waiting_trial_id = lambda: queued._trial_id
    try:
        study.optimize(objective, n_trials=1, callbacks=[DiscardCheckpoint(checkpoints_of(setup))],
                       catch=(Exception,))
    finally:
        del study._pop_waiting_trial_id
    done = study._storage.get_trial(queued._trial_id)
    return done if done.state == TrialState.COMPLETE else None


def count(study: optuna.Study) -> int:
    """Trials that count toward the target: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class FailureStreak:
    """Stops the study after `limit` failed trials in a row, remembering the last reason."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.tripped, self.last_reason = limit, 0, False, ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != TrialState.FAIL or trial.user_attrs.get("surplus"):
            self.streak = 0 if trial.state in COUNTED else self.streak
            return
        self.streak += 1
        self.last_reason = trial.user_attrs.get("fail_reason", "unknown")
        if self.streak >= self.limit:
            self.tripped = True
            study.stop()


def make_objective(setup: Setup, parent: str, environment: dict, summary: SearchSummary):
    """The function Optuna calls per trial: suggest, train, evaluate, log, keep the best models."""
    from optuna_integration import KerasPruningCallback

    from runners import train as runner
    from runners.train import ArchitectureError

    study, client, space = setup.study, setup.client, setup.space

    def objective(trial: optuna.Trial) -> float:
        retry_of = retried_trial(study, trial)
        refit_of = trial.user_attrs.get("refit_of")  # the refit phase's trial (see refit_best)
        epochs = int(trial.user_attrs.get("epochs") or setup.epochs)
        # a refit's schedule spans its epochs: early stopping and the pruner must not cut it short, and it runs
        # even when exploration reached --trials
        patience = epochs if refit_of is not None else setup.patience
        if refit_of is None and beyond_target(study, trial, setup.target):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", f"study already has {setup.target} trials")
            raise SurplusTrial(f"study already has {setup.target} trials")
        summary.trials_run += 1
        folder = checkpoint_dir(checkpoints_of(setup), trial.number)
        resumed = take_over_checkpoint(setup, trial, retry_of)
        if retry_of is not None and resumed is None:
            close_retried_run(client, trial)
        params = spaces.suggest_params(trial, space)
        seed = resumed["seed"] if resumed else setup.config.seed * 1000 + trial.number
        for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "seed": seed}.items():
            trial.set_user_attr(key, value)
        context = {"dataset": setup.dataset, "subset": setup.subset, "epochs_max": epochs,
                   "patience": patience, "seed": seed, "model": space.model}
        source = f"retry:{retry_of}" if retry_of is not None else trial.user_attrs.get("source", "sampler")
        refit_tags = {}
        if refit_of is not None:  # a resumed or retried refit is still the refit
            source, refit_tags = "refit", {"search.refit": "true", "search.refit_of": str(refit_of)}
        tags = {"search.source": source, "search.device": environment.get("device", ""), **refit_tags,
                "search.baseline": trial.user_attrs.get("baseline", ""),
                "search.rerun_command": f"python -m search.run --rerun {study.study_name}:{trial.number}"}
        if resumed:
            trial.set_user_attr("resumes", resumed["trial"])
            trial.set_user_attr("resumed_from_epoch", resumed["epoch"])
            log.info(f"trial {trial.number}: resumes trial {resumed['trial']} after its epoch {resumed['epoch']}")
            run_id = resumed["mlflow_run_id"]
            tracking.reopen_trial_run(client, run_id, parent, trial.number, {
                **tags, "search.resumes_trial": resumed["trial"], "search.resumed_at_epoch": resumed["epoch"]})
        else:
            run_id = tracking.start_trial_run(client, setup.experiment_id, parent, study.study_name, trial.number,
                                              params, context, tags=tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        write_trial_file(folder, study.study_name, trial.number, run_id, params, seed)
        epochs_done = (runner.checkpoint_state(folder) or {}).get("history", {})
        if resumed:  # an epoch saved but not logged (killed between the two) is logged now, from the checkpoint
            tracking.log_missing_epochs(client, run_id, epochs_done)
        restored = epochs_done.get("val_accuracy", [])
        reported = study._storage.get_trial(trial._trial_id).intermediate_values
        for step, value in enumerate(restored if len(study.directions) == 1 else []):  # multi-objective: no reports
            if step not in reported:  # a heartbeat retry may have inherited them
                trial.report(value, step)  # the restored epochs, so the pruner sees the whole curve
        progress = runner.Progress(trial.number, count(study) + 1, setup.target, epochs, best_value(study))
        progress.val_history = list(restored)
        try:
            runner_module = model_runner(space.model)
            data = dataset_at(setup, params["image_size"])
            if not resumed:
                tracking.log_datasets(client, run_id, data)
            logger = tracking.EpochLogger(client, run_id)
            started = time.perf_counter()
            prunable = len(study.directions) == 1 and refit_of is None
            # a refit round resumed in a later run keeps no deadline: its budget was the earlier run's
            deadline = trial.user_attrs.get("deadline") if not resumed else None
            result = runner_module.train_and_evaluate(
                params, data, epochs=epochs, patience=patience, seed=seed, recipes=space.recipes,
                callbacks=([runner.Deadline(deadline)] if deadline else []) + [logger, progress]
                + ([KerasPruningCallback(trial, "val_accuracy")] if prunable else []),
                options={**runner_options(setup), "initial_weights": start_weights(setup, trial)}, checkpoint=folder)
            trial_seconds = time.perf_counter() - started
        except ArchitectureError as err:
            runner.release()
            end_trial(client, run_id, trial, "PRUNED", str(err))
            log.info(f"trial {trial.number}: rejected before training: {err}")
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned:
            runner.release()
            metrics = {"best_val_accuracy": max(progress.val_history, default=None),
                       "epochs_run": len(progress.val_history),
                       "budget_fraction": len(progress.val_history) / max(setup.epochs, 1)}
            tracking.log_metrics(client, run_id, metrics)
            end_trial(client, run_id, trial, "PRUNED", f"pruned after epoch {len(progress.val_history)}")
            log.info(f"trial {trial.number}: pruned after epoch {len(progress.val_history)}")
            raise
        except KeyboardInterrupt:
            # the checkpoint stays: the next invocation resumes this trial from its last finished epoch
            trial.set_user_attr("interrupted", True)
            end_trial(client, run_id, trial, "KILLED", "interrupted (Ctrl-C); the next run resumes it")
            raise
        except Exception as err:
            runner.release()
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:500] if str(err) else ''}"
            end_trial(client, run_id, trial, "FAIL", reason)
            log.warning(f"trial {trial.number}: failed: {reason}")
            raise
        metrics = finished(setup, trial, run_id, result, trial_seconds, logger.seconds, data)
        values = [metrics[OBJECTIVES[name][1]] for name in parse_objectives(setup.config.objectives)]
        return values[0] if len(values) == 1 else values

    return objective


def beyond_target(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True if the study reached its target; waits while older running trials of other workers could reach it.

    Workers claim trials at the same moment, so counting only finished trials would overshoot the target by
    up to one trial per worker. A trial waits on older ones only (no two wait on each other); a trial whose
    worker died stops holding it once found dead (heartbeat storages after the grace period, or a dead pid
    on this host)."""
    host, announced = socket.gethostname(), False
    while True:
        trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
        done = sum(t.state in COUNTED for t in trials)
        ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number
                    and not died_here(t, host))
        if done >= target or done + ahead < target:
            return done >= target
        if not announced:
            log.info(f"trial {trial.number}: waiting for {ahead} running trials that may complete the study")
            announced = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # as Optuna does before each trial
        time.sleep(2)


def died_here(trial: optuna.trial.FrozenTrial, host: str) -> bool:
    """True for a trial run by a process of this host that no longer exists."""
    return trial.user_attrs.get("host") == host and not tracking.pid_alive(str(trial.user_attrs.get("pid")))


def model_runner(model: str):
    """The runners/ module named by a space's `model:`; it provides train_and_evaluate(params, data, ...)."""
    import importlib

    try:
        return importlib.import_module(f"runners.{model}")
    except ModuleNotFoundError:
        raise ConfigError(f"unknown model '{model}' in the space; a model is a module of runners/ "
                          "(scratch_cnn, transfer)") from None


def runner_options(setup: Setup) -> dict:
    """Run-wide settings a runner may need besides the trial's parameters."""
    c = setup.config
    return {"weights": c.weights, "workdir": str(c.resolved_workdir()), "data_dir": c.data_dir,
            "architectures": setup.space.architectures, "max_mflops": setup.space.budget.get("max_mflops")}


def start_weights(setup: Setup, trial: optuna.Trial) -> str | None:
    """The kept model a refit's second round starts from (user attr `continues`), or None: a fresh start."""
    continues = trial.user_attrs.get("continues")
    if continues is None:
        return None
    path = models_dir(setup) / f"trial-{continues}.keras"
    if not path.is_file():  # fell out of the kept models (--keep-models): the round trains from scratch
        log.warning(f"trial {trial.number}: trial {continues}'s model is not kept; training from scratch")
        return None
    return str(path)


def dataset_at(setup: Setup, image_size: int):
    """The dataset at a trial's image size, loaded once per size (the last two sizes stay in memory)."""
    cache = setup.data_cache
    if image_size not in cache:
        if len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[image_size] = load_data(setup.config, setup.dataset, image_size, setup.subset,
                                      setup.config.resolved_workdir())
    return cache[image_size]


def end_trial(client, run_id: str, trial: optuna.Trial, state: str, reason: str) -> None:
    """Record why a trial ended on both sides."""
    trial.set_user_attr("fail_reason" if state in ("FAIL", "KILLED") else "end_reason", reason)
    tracking.finish_trial_run(client, run_id, state, reason)


def finished(setup: Setup, trial: optuna.Trial, run_id: str, result, trial_seconds: float,
             logging_seconds: float, data) -> dict:
    """Log a completed trial's summary and test errors, keep its model if among the best K, free its memory."""
    from runners import train as runner

    metrics = {**trial_metrics(result, trial_seconds, logging_seconds),
               # of the full fidelity (max epochs); a refit's second round counts the first round's epochs too
               "budget_fraction": (result.epochs_run + trial.user_attrs.get("epochs_before", 0)) / max(setup.epochs, 1)}
    tracking.log_metrics(setup.client, run_id, metrics)
    if result.tags:
        tracking.set_tags(setup.client, run_id, result.tags)
    for key in ("test_accuracy", "test_top3_accuracy", "train_seconds", "param_count", "inference_ms",
                "budget_fraction", "epochs_run", "trial_seconds"):
        trial.set_user_attr(key, metrics.get(key))
    timed = result.history.get("epoch_seconds", [])[1:] or result.history.get("epoch_seconds", [])
    if timed:  # what one more epoch of this configuration costs, for a refit's plan (the first epoch also traces)
        trial.set_user_attr("epoch_seconds", sum(timed) / len(timed))
    constraints = constraint_values(setup.config, metrics)
    for name, over in constraints.items():  # Optuna's constrained search (TPE) and Pareto front read these
        trial.set_constraint(name, over)
    if constraints:
        tracking.set_tags(setup.client, run_id, {"search.feasible": str(all(v <= 0 for v in constraints.values()))})
    keep_model(setup, trial, result)
    # the confusion matrix picture and tables take ~0.4 s: drawn and logged while the next trial starts,
    # and the run closes once they are stored (finish_invocation waits for the last ones)
    labels, probabilities = data.splits["test"][1], result.test_probabilities
    setup.background.submit(close_completed_run, setup.client, run_id, labels, probabilities, data.class_names)
    runner.release(result)
    return metrics


def close_completed_run(client, run_id: str, labels, probabilities, class_names: list[str]) -> None:
    """Log a completed trial's test evaluation artifacts, then end its run as COMPLETE."""
    from search.evaluation import log_evaluation

    try:
        if probabilities is not None:
            log_evaluation(client, run_id, labels, probabilities, class_names)
    finally:
        tracking.finish_trial_run(client, run_id, "COMPLETE")


def trial_metrics(result, trial_seconds: float, logging_seconds: float) -> dict:
    """The summary metrics of a completed trial's run, the same for every driver."""
    import resource

    return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "best_val_accuracy": result.val_accuracy, "best_val_loss": result.val_loss,
            "best_val_top3_accuracy": result.val_top3_accuracy, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "epochs_resumed_from": result.resumed_from_epoch,
            "param_count": result.param_count,
            "train_seconds": result.fit_seconds, "trial_seconds": trial_seconds,
            "logging_seconds": logging_seconds, **result.test}


def models_dir(setup: Setup) -> Path:
    """Where a study keeps the Keras models of its best trials."""
    return setup.config.resolved_workdir() / "models" / setup.study.study_name


def keep_model(setup: Setup, trial: optuna.Trial, result) -> None:
    """Save this trial's model if it ranks among the study's best K; delete models that fell out."""
    folder = models_dir(setup)
    ranked = sorted([(t.values[0], t.number) for t in setup.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if feasible(t)]
                    + [(result.val_accuracy, trial.number)], reverse=True)[: setup.config.keep_models]
    keep = {number for _, number in ranked}
    if trial.number in keep:
        folder.mkdir(parents=True, exist_ok=True)
        result.model.save(folder / f"trial-{trial.number}.keras")
    for path in folder.glob("trial-*.keras"):
        if int(path.stem.split("-")[1]) not in keep:
            path.unlink()


def best_value(study: optuna.Study) -> float | None:
    """The study's best validation accuracy so far, or None."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max((t.values[0] for t in complete if feasible(t)), default=None)


def retried_trial(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of the trial a heartbeat retry re-runs (the last dead attempt), or None for other trials."""
    history = study._storage.get_trial_system_attrs(trial._trial_id).get("retry_history")
    return history[-1] if history else None


def close_retried_run(client, trial: optuna.Trial) -> None:
    """A retry that starts afresh (no checkpoint to take over) fails the dead attempt's MLflow run.

    A heartbeat retry starts with a copy of the dead attempt's user attrs, its run id among them."""
    stale_run = trial.user_attrs.get("mlflow_run_id")
    if stale_run and client.get_run(stale_run).info.status == "RUNNING":
        tracking.finish_trial_run(client, stale_run, "FAIL",
                                  f"its worker stopped sending heartbeats; retried as trial {trial.number}")


# ---------------------------------------------------------------- checkpoints and resuming


TRIAL_FILE = "trial.json"


def checkpoints_of(setup: Setup) -> Path:
    """The folder holding the checkpoints of a study's running trials."""
    return setup.config.resolved_workdir() / "checkpoints" / setup.study.study_name


def checkpoint_dir(checkpoints: Path, number: int) -> Path:
    """One trial's checkpoint folder: its training state (runners.train.EpochCheckpoint) and trial.json."""
    return checkpoints / f"trial-{number}"


def write_trial_file(folder: Path, study: str, number: int, run_id: str, params: dict, seed: int) -> None:
    """What a taking-over trial needs besides the training state: the run to continue, parameters, seed."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"study": study, "trial": number, "mlflow_run_id": run_id, "params": params, "seed": seed},
                      default=str)
    (folder / f"{TRIAL_FILE}.tmp").write_text(text)
    os.replace(folder / f"{TRIAL_FILE}.tmp", folder / TRIAL_FILE)


def claim_checkpoint(checkpoints: Path, old: int, new: int) -> bool:
    """Move a dead trial's checkpoint folder to the trial that takes it over; False if it has none.

    The rename is atomic: when two processes try to take the same trial over, one of them gets it."""
    try:
        os.rename(checkpoint_dir(checkpoints, old), checkpoint_dir(checkpoints, new))
    except FileNotFoundError:
        return False
    return True


def take_over_checkpoint(setup: Setup, trial: optuna.Trial, retry_of: int | None) -> dict | None:
    """For a trial that continues a dead one: the dead trial's trial.json and the epochs it finished; else None.

    A trial enqueued by recover_stale_trials already holds the folder; a heartbeat retry claims it here.
    A dead trial whose runner kept no state but logged epochs (a fine-tuning transfer trial) cannot be
    continued without logging epochs twice: such a trial restarts, in a new run."""
    checkpoints, client = checkpoints_of(setup), setup.client
    folder = checkpoint_dir(checkpoints, trial.number)
    if retry_of is not None and not folder.is_dir():
        claim_checkpoint(checkpoints, retry_of, trial.number)
    if not (folder / TRIAL_FILE).is_file():
        return None
    from runners.train import checkpoint_state

    found = json.loads((folder / TRIAL_FILE).read_text())
    state = checkpoint_state(folder)
    found["epoch"] = state["epoch"] if state else 0
    if not state and client.get_run(found["mlflow_run_id"]).data.metrics:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return found


def discard_checkpoint(checkpoints: Path | None, number: int) -> None:
    """Remove a trial's checkpoint folder (the trial ended, or will never be continued)."""
    if checkpoints is not None:
        shutil.rmtree(checkpoint_dir(checkpoints, number), ignore_errors=True)


class DiscardCheckpoint:
    """An Optuna callback: a trial's checkpoint goes once its end is recorded (Ctrl-C never gets here)."""

    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        discard_checkpoint(self.checkpoints, trial.number)


def enqueue_takeover(study: optuna.Study, dead: optuna.trial.FrozenTrial, checkpoints: Path) -> int | None:
    """Queue a trial with a dead trial's parameters and hand it the checkpoint; its number, or None.

    None when the dead trial left no checkpoint folder (or another process took it over first)."""
    if not (checkpoint_dir(checkpoints, dead.number) / TRIAL_FILE).is_file():
        return None
    carried = {k: dead.user_attrs[k] for k in ("refit_of", "epochs") if k in dead.user_attrs}  # a refit stays one
    study.enqueue_trial(dead.params, user_attrs={"source": f"resume:{dead.number}", "resumes": dead.number, **carried})
    queued = max((t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.user_attrs.get("resumes") == dead.number), key=lambda t: t.number)
    if claim_checkpoint(checkpoints, dead.number, queued.number):
        return queued.number
    # another process took it over between our look and our rename: this copy must never run
    study._storage.set_trial_user_attr(queued._trial_id, "fail_reason", f"trial {dead.number} was resumed elsewhere")
    study._storage.set_trial_state_values(queued._trial_id, state=TrialState.FAIL)
    return None


def recover_stale_trials(study: optuna.Study, client, exp_id: str, checkpoints: Path | None = None,
                         resume: bool = False) -> None:
    """After a crash: Optuna trials left RUNNING by a dead process on this host become FAIL, and open MLflow runs close.

    With `resume` (the study still needs trials), such a trial and one stopped by Ctrl-C are continued from
    their checkpoints: a new trial with the same parameters is queued and takes the checkpoint over (Optuna
    cannot hand a trial to another process). With a heartbeat storage (a database server) Optuna's retry
    queues it instead, as its heartbeat would after the grace period, and the retry takes the checkpoint
    over when it starts; failed trials whose worker vanished elsewhere get their run closed."""
    host = socket.gethostname()
    storage = study._storage
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if died_here(t, host):
            resumed_as = enqueue_takeover(study, t, checkpoints) if resume and checkpoints and not retry else None
            reason = "its process ended during the trial"
            if resumed_as is not None:
                reason += f"; resumed as trial {resumed_as}"
                storage.set_trial_user_attr(t._trial_id, "resumed_as", resumed_as)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            log.info(f"trial {t.number} was left running by a process that ended; marked failed"
                     + (f", resumed as trial {resumed_as}" if resumed_as is not None else ""))
            if retry:
                retry(study, storage.get_trial(t._trial_id))
            elif resumed_as is None:
                discard_checkpoint(checkpoints, t.number)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if checkpoints and t.user_attrs.get("interrupted") and checkpoint_dir(checkpoints, t.number).is_dir():
            resumed_as = enqueue_takeover(study, t, checkpoints) if resume else None
            if resumed_as is None:
                discard_checkpoint(checkpoints, t.number)
            else:
                log.info(f"trial {t.number} was interrupted; resumed as trial {resumed_as}")
    tracking.close_orphans(client, exp_id, live=set())
    still_open = {run.info.run_id for run in tracking.open_runs(client, exp_id)}
    # a resumed trial's run is shared with the failed trial it continues
    still_open -= {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id in still_open:
            still_open.discard(run_id)  # a retry that never ran carries its original's run id too
            tracking.finish_trial_run(client, run_id, "FAIL", "its worker stopped during the trial")


def finish_invocation(setup: Setup, parent: str, summary: SearchSummary, status: str) -> None:
    """Record the best so far on the parent run, log and register the best model, report, close the parent run."""
    study, client = setup.study, setup.client
    setup.background.shutdown(wait=True)  # every trial's evaluation is logged and its run closed
    # a worker that died while this one finished the study must not leave its trial running forever
    recover_stale_trials(study, client, setup.experiment_id, checkpoints_of(setup),
                         resume=count(study) < setup.target)
    # the best model is the most accurate feasible one; with several objectives the front is in the leaderboard
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if complete:
        best = max(complete, key=lambda t: t.values[0])
        summary.best_value, summary.best_params, summary.best_trial = best.values[0], best.params, best.number
        tracking.log_metrics(client, parent, {"best_val_accuracy": best.values[0], "trials_counted": count(study)})
        tracking.set_tags(client, parent, {"search.best_trial": best.number,
                                           "search.best_params": json.dumps(best.params, default=str)})
        log_best_model(setup, best)
        keras_path = models_dir(setup) / f"trial-{best.number}.keras"
        try:  # results are for people: a failure here must not hide how the invocation ended
            from search import registry, report
            from search.results import leaderboard

            if keras_path.is_file() and setup.data_cache and best.user_attrs.get("mlflow_run_id"):
                class_names = next(iter(setup.data_cache.values())).class_names
                version = registry.register_trial(client, study.study_name, best.user_attrs["mlflow_run_id"],
                                                  keras_path, class_names, best.number, best.values[0])
                log.info(f"best model: models:/{version.name}/{version.version} (trial {best.number})")
            table = leaderboard([study.study_name], setup.tracking_uri)
            report.log_study_report(client, setup.experiment_id, study.study_name, study, table,
                                    setup.config.resolved_workdir() / "reports")
        except Exception as err:
            log.warning(f"could not register the best model or write the study report: {type(err).__name__}: {err}")
    tracking.set_tags(client, parent, {"search.stopped": summary.stopped, **summary.stop_details})
    client.set_terminated(parent, status)


def log_best_model(setup: Setup, best) -> None:
    """Log the best trial's Keras model to its MLflow run, once."""
    run_id = best.user_attrs.get("mlflow_run_id")
    path = models_dir(setup) / f"trial-{best.number}.keras"
    if not run_id or not path.is_file():
        return
    run = setup.client.get_run(run_id)
    if run.data.tags.get("search.model_uri"):
        return
    import keras

    uri = tracking.log_keras_model(setup.client, run_id, keras.models.load_model(path))
    tracking.set_tags(setup.client, run_id, {"search.model_uri": uri})
