"""Where a study lives: Optuna storages (SQLite, a journal file, a database server), MLflow store URIs, and the
files it keeps under the workdir (what `search.results --disk` measures and `--prune` removes).

Defaults (conventions.md): Optuna `sqlite:///<workdir>/optuna.db`, MLflow `sqlite:///<workdir>/mlflow.db`, two
databases (both keep an `alembic_version` table); `--storage PATH` (no `://`) is Optuna's journal file, and
`--workers N` without `--storage` shares `<workdir>/optuna.journal`. A study is found by name in either default.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from search.config import HEARTBEAT_RETRIES, HEARTBEAT_SECONDS, SearchConfig
from search.errors import ConfigError


def redact(url: str | None) -> str | None:
    """A store URL with any password replaced by ***, safe for logs, params and tags."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


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


def existing_tracking_store(config_uri: str | None, workdir: str | Path = "mlruns") -> str | None:
    """The MLflow store to read, or None when its SQLite file does not exist (a question must not create it)."""
    uri = tracking_uri(config_uri, workdir)
    return None if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file() else uri


def artifact_root(uri: str, workdir: str | Path = "mlruns") -> str | None:
    """Local stores keep artifacts under the workdir; a tracking server decides for itself."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return str(Path(workdir).expanduser() / "artifacts")


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
        beat = int(os.environ.get("SEARCH_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=beat, grace_period=3 * beat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=HEARTBEAT_RETRIES))
    except ImportError as err:
        raise ConfigError(f"Optuna storage {redact(url)} needs a database driver: {err}. "
                          "For PostgreSQL: pip install 'dogsearch[postgres]'.") from None
    except Exception as err:
        raise ConfigError(f"Optuna storage {redact(url)} cannot be opened: {type(err).__name__}: "
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
    where = ", ".join(redact(u) for u in urls) or f"{workdir}/ (no Optuna store there yet)"
    raise ConfigError(f"no study named '{name}' in {where}. Known studies: {', '.join(sorted(known)) or 'none'}.")


def trials_in(storage, study_name: str) -> int:
    """Trials the study already holds in a storage, 0 when it does not exist yet."""
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(study_name))
    except KeyError:
        return 0
