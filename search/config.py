"""Every setting of a search, with its default, in one place; the command line is a thin layer over it.

A notebook builds `SearchConfig(space="scratch_cnn", trials=5)` and calls `search.study.run_search` with
it; `python -m search.run --space scratch_cnn --trials 5` does exactly that.
"""
from __future__ import annotations

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
    refit: float | str = "auto"            # fraction of the timeout kept to retrain the best (auto: 0.5 with a timeout)
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
    keep_models: int = 3                   # models of the best K trials kept on disk
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
    max_memory_growth: float = 400         # MB a worker may grow after its first trial before it restarts
    driver: str = "optuna"                 # optuna | kerastuner
    tuner: str = "hyperband"               # kerastuner driver: hyperband | bayesian | random
    extra_tags: dict = field(default_factory=dict)

    def resolved_workdir(self) -> Path:
        """The workdir, created."""
        path = Path(self.workdir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path


# What a study can optimise: the first is always validation accuracy; the others are costs to minimise,
# each read from a completed trial's metrics.
OBJECTIVES = {"val_accuracy": ("maximize", "best_val_accuracy"), "train_seconds": ("minimize", "train_seconds"),
              "inference_ms": ("minimize", "inference_ms"), "params": ("minimize", "param_count")}


def sqlite_url(path: Path) -> str:
    """sqlite:/// URL of a path made absolute (MLflow caches stores by URL: a relative one follows cwd)."""
    return f"sqlite:///{path.expanduser().resolve().as_posix()}"


def optuna_storage_url(config: SearchConfig) -> str:
    """--storage, else the journal file for several workers, else SQLite under the workdir."""
    if config.storage:
        return config.storage
    workdir = Path(config.workdir).expanduser()
    if config.workers > 1:
        return str(workdir / "optuna.journal")
    return sqlite_url(workdir / "optuna.db")


def default_optuna_stores(workdir: str | Path = "mlruns") -> list[str]:
    """Where a study is looked for when no --storage is given: the SQLite database, then the journal."""
    workdir = Path(workdir).expanduser()
    stores = []
    if (workdir / "optuna.db").is_file():
        stores.append(sqlite_url(workdir / "optuna.db"))
    if (workdir / "optuna.journal").is_file():
        stores.append(str(workdir / "optuna.journal"))
    return stores


def tracking_uri(config_uri: str | None, workdir: str | Path = "mlruns") -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db."""
    return config_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_url(Path(workdir).expanduser() / "mlflow.db")


def artifact_root(uri: str, workdir: str | Path = "mlruns") -> str | None:
    """Local stores keep artifacts under the workdir; a tracking server decides for itself."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return str(Path(workdir).expanduser() / "artifacts")
