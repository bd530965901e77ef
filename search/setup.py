"""Everything a run settles before its first trial, for every driver: the space and its budget, the runner,
the data, the MLflow experiment. Any problem here is a ConfigError (exit 2) before anything trains.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from search import space as spaces
from search import tracking
from search.config import (DATA_SIZES_KEPT, KEEP_MODELS, MAX_MEMORY_GROWTH, MAX_MFLOPS_UNMEASURED,
                           SearchConfig)
from search.errors import ConfigError
from search.stores import artifact_root, tracking_uri

log = logging.getLogger("search")


@dataclass
class Budget:
    """The space's budget after the command line's overrides (0 means none for timeout and subset)."""

    trials: int
    epochs: int
    timeout: float | None
    subset: int | None
    patience: int


@dataclass
class RunSetup:
    """What every driver settles before its first trial (the Optuna driver adds its study)."""

    config: SearchConfig
    space: spaces.Space
    dataset: str
    study_name: str
    target: int
    timeout: float | None
    epochs: int
    patience: int
    subset: int | None
    runner: object            # the runners/ module of the space's `model:` (runners.protocol.Runner)
    client: object            # MlflowClient
    experiment_id: str
    tracking_uri: str
    data_cache: dict = field(default_factory=dict)  # loaded datasets by image size, shared by the trials
    # a completed trial's evaluation is logged and its run closed here while the next trial starts
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    prepared_at: float = field(default_factory=time.time)  # when the time budget began if the config says nothing
    derived_max_mflops: float | None = None  # `max_mflops: auto`, once the machine is measured (search/plan.py)

    @property
    def max_mflops(self) -> float | None:
        """The forward cost above which a model is refused: the space's number, or with `auto` the one derived
        from the measured speed (MAX_MFLOPS_UNMEASURED when nothing was measured: a run without a time budget)."""
        given = self.space.budget.get("max_mflops")
        if given == "auto":
            return self.derived_max_mflops or MAX_MFLOPS_UNMEASURED
        return given

    @property
    def keep_models(self) -> int:
        """How many of the best trials' models stay on disk: --keep-models, else the space's, else KEEP_MODELS."""
        return self.config.keep_models or self.space.budget.get("keep_models") or KEEP_MODELS

    @property
    def max_memory_growth(self) -> float:
        """MB this process may grow after its first trial: --max-memory-growth, else the space's, else the default."""
        return self.config.max_memory_growth or self.space.budget.get("max_memory_growth") or MAX_MEMORY_GROWTH

    @property
    def budget_end(self) -> float | None:
        """Unix seconds the run's time budget ends (None: no time budget)."""
        if not self.timeout:
            return None
        return (self.config.budget_started or self.prepared_at) + self.timeout

    @property
    def workdir(self) -> Path:
        """The folder every file of the run goes under (created)."""
        return self.config.resolved_workdir()

    @property
    def models(self) -> Path:
        """Where the study keeps the Keras models of its best trials."""
        return self.workdir / "models" / self.study_name

    @property
    def checkpoints(self) -> Path:
        """Where the study keeps the checkpoints of its running trials."""
        return self.workdir / "checkpoints" / self.study_name


def as_config_error(build, *args):
    """Run a set-up step, turning missing files and bad values (a runner's RunnerConfigError is a ValueError)
    into ConfigError (exit 2)."""
    try:
        return build(*args)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(str(err).strip("'\"")) from None


def resolve_space(config: SearchConfig) -> tuple[str, spaces.Space, Budget]:
    """The dataset, the checked space for it (with --image-size applied) and the budget: for every driver."""
    dataset = config.dataset or spaces.load_space(config.space).dataset
    space = spaces.load_space(config.space, dataset)
    b = space.budget
    # a run's own flags win: `--trials 2 --epochs 1` without --timeout is a short run, not the space's time
    # budget (and its refit) around two trials
    own_size = config.trials is not None or config.epochs is not None
    space_timeout = None if own_size else b["timeout"]
    budget = Budget(trials=config.trials or b["trials"], epochs=config.epochs or b["epochs"],
                    timeout=space_timeout if config.timeout is None else (config.timeout or None),
                    subset=b["subset"] if config.subset is None else (config.subset or None),
                    patience=b["patience"])
    if config.image_size:
        space.params["image_size"] = spaces.Param("image_size", "fixed", value=config.image_size,
                                                  default=config.image_size)
    return dataset, space, budget


def prepare_run(config: SearchConfig, study_suffix: str = "", check=None) -> RunSetup:
    """Space, the driver's `check(space, budget)` of its flags, runner, data, MLflow, in that order (cheap
    checks first): every configuration error surfaces here."""
    return as_config_error(_prepare_run, config, study_suffix, check)


def _prepare_run(config: SearchConfig, study_suffix: str, check) -> RunSetup:
    from runners.protocol import runner_named

    workdir = config.resolved_workdir()
    dataset, space, budget = resolve_space(config)
    if check:
        check(space, budget)
    apply_environment(space.environment)  # before the runner's import starts TensorFlow
    runner = runner_named(space.model)
    if space.fidelity.get("resource") == "cost" and not hasattr(runner, "forward_mflops"):
        raise ConfigError(f"{space.source}: fidelity.resource: cost needs a runner that prices a configuration "
                          f"(forward_mflops); runners/{space.model}.py has none: use resource: epochs")
    narrow(space, runner, config)
    study_name = config.study_name or f"{space.name}-{dataset.split(':')[0]}{study_suffix}"
    cache = {}
    size = spaces.default_params(space).get("image_size", 32)
    cache[size] = load_data(config, dataset, size, budget.subset, workdir)  # missing data stops the run here
    uri = tracking_uri(config.tracking_uri, workdir)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, study_name, artifact_root(uri, workdir))
    return RunSetup(config, space, dataset, study_name, budget.trials, budget.timeout, budget.epochs,
                    budget.patience, budget.subset, runner, client, exp_id, uri, data_cache=cache)


def apply_environment(environment: dict[str, str]) -> None:
    """The space's environment variables, for TensorFlow to read when it starts; a variable already set wins
    (the user's own), and in a process where TensorFlow has started (a notebook) they change nothing."""
    for name, value in environment.items():
        if name not in os.environ:
            os.environ[name] = value
            log.info(f"environment: {name}={value} (from the space)")


def narrow(space: spaces.Space, runner, config: SearchConfig) -> None:
    """Let the runner check --backbone and --weights against the space's choices, and narrow them."""
    choices = {name: list(p.choices) for name, p in space.params.items() if p.type == "categorical"}
    defaults = spaces.default_params(space)
    for name, (values, default) in runner.narrow_choices(choices, defaults, backbone=config.backbone,
                                                         weights=config.weights).items():
        space.params[name] = spaces.replace_choices(space.params[name], values, default)


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


def dataset_at(setup: RunSetup, image_size: int):
    """The dataset at a trial's image size, loaded once per size (the last DATA_SIZES_KEPT sizes stay in memory)."""
    cache = setup.data_cache
    if image_size not in cache:
        if len(cache) >= DATA_SIZES_KEPT:
            cache.pop(next(iter(cache)))
        cache[image_size] = load_data(setup.config, setup.dataset, image_size, setup.subset, setup.workdir)
    return cache[image_size]


def class_names(setup: RunSetup) -> list[str]:
    """The class names of the run's data (the same at every image size)."""
    return next(iter(setup.data_cache.values())).class_names


def runner_options(setup: RunSetup) -> dict:
    """Run-wide settings a runner may need besides the trial's parameters (runners/protocol.py)."""
    c = setup.config
    return {"weights": c.weights, "workdir": str(setup.workdir), "data_dir": c.data_dir,
            "architectures": setup.space.architectures, "max_mflops": setup.max_mflops,
            "budget_end": setup.budget_end}
