"""What a study keeps on disk, and freeing it: `python -m search.results --disk` and `--prune STUDY`.

Per study: kept models, MLflow artifacts, checkpoints, Keras Tuner files, reports (MB); then what the studies
share (image and feature caches, the stores). Pruning keeps the best trial's model and removes the other kept
models, the artifacts of pruned and failed trials (their runs stay, tagged search.artifacts_pruned) and empty
checkpoint folders.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from search.errors import ConfigError
from search.stores import existing_tracking_store, tracking_uri as resolve_tracking_uri
from search.tracking import connect, live_runs_here, set_tags, study_experiments

MB = 1024 * 1024
STUDY_FOLDERS = ("models", "checkpoints", "kerastuner")  # <workdir>/<kind>/<study>/


def folder_bytes(path: Path | None) -> int:
    """Bytes of the files under a folder (or of one file); 0 when it does not exist."""
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def studies_on_disk(workdir: str | Path) -> set[str]:
    """Studies that have a folder of their own under the workdir (models, checkpoints, Keras Tuner files)."""
    root = Path(workdir).expanduser()
    return {p.name for kind in STUDY_FOLDERS if (root / kind).is_dir() for p in (root / kind).iterdir() if p.is_dir()}


def study_files(workdir: str | Path, study: str) -> dict:
    """A study's own files under the workdir: kept models (count, MB), checkpoints, Keras Tuner files, reports (MB)."""
    root = Path(workdir).expanduser()
    models = sorted((root / "models" / study).glob("*.keras"))
    return {"kept_models": len(models), "models_mb": sum(folder_bytes(m) for m in models) / MB,
            "checkpoints_mb": folder_bytes(root / "checkpoints" / study) / MB,
            "kerastuner_mb": folder_bytes(root / "kerastuner" / study) / MB,
            "reports_mb": (folder_bytes(root / "reports" / f"{study}.html")
                           + folder_bytes(root / "reports" / study)) / MB}


def shared_files(workdir: str | Path) -> list[dict]:
    """What the studies under a workdir share (caches keyed by their inputs, the stores), and the whole, in MB."""
    root = Path(workdir).expanduser()
    return [{"what": "image cache (cache/images)", "mb": folder_bytes(root / "cache" / "images") / MB},
            {"what": "feature cache (cache/features)", "mb": folder_bytes(root / "cache" / "features") / MB},
            {"what": "activation cache (cache/activations)", "mb": folder_bytes(root / "cache" / "activations") / MB},
            {"what": "stores (mlflow.db, optuna.db, optuna.journal)",
             "mb": sum(folder_bytes(root / f) for f in ("mlflow.db", "optuna.db", "optuna.journal")) / MB},
            {"what": f"everything under {root}/", "mb": folder_bytes(root) / MB}]


def remove_models_except(workdir: str | Path, study: str, keep: int) -> tuple[list[str], int]:
    """Delete a study's kept models (and their saved predictions, and the ensemble) but trial `keep`'s: the file
    names removed and the bytes freed. Registered models live on in MLflow's artifacts."""
    removed, freed = [], 0
    folder = Path(workdir).expanduser() / "models" / study
    for path in sorted([*folder.glob("trial-*.*"), *folder.glob("ensemble.keras")]):
        if not path.name.startswith(f"trial-{keep}."):
            freed += folder_bytes(path)
            removed.append(path.name)
            path.unlink()
    return removed, freed


def remove_empty_folders(folder: Path) -> int:
    """Remove the empty folders under a folder, deepest first, and the folder itself if that empties it."""
    if not folder.is_dir():
        return 0
    removed = 0
    deepest_first = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for path in deepest_first + [folder]:
        if not any(path.iterdir()):
            path.rmdir()
            removed += 1
    return removed


def local_path(uri: str | None) -> Path | None:
    """The folder behind a local artifact URI (file:// or a plain path); None for a server's or a cloud's."""
    if not uri:
        return None
    if uri.startswith("file:"):
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(uri))
    return None if "://" in uri or ":" in uri.split("/")[0] else Path(uri)


def artifact_folders(client: MlflowClient, exp_id: str) -> dict[str, Path]:
    """The local folders of an experiment's run artifacts and logged models (run or model id -> folder)."""
    folders, token = {}, None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        folders.update({run.info.run_id: local_path(run.info.artifact_uri) for run in page})
        if not (token := page.token):
            break
    with contextlib.suppress(Exception):  # a store without logged models (an older server)
        folders.update({m.model_id: local_path(m.artifact_location) for m in client.search_logged_models([exp_id])})
    return {key: path for key, path in folders.items() if path is not None}


def remove_run_artifacts(client: MlflowClient, run_id: str) -> int:
    """Delete a run's local artifacts (the run stays, tagged search.artifacts_pruned); the bytes freed."""
    import shutil

    folder = local_path(client.get_run(run_id).info.artifact_uri)
    size = folder_bytes(folder)
    if folder is not None and folder.is_dir() and size:
        shutil.rmtree(folder)
        set_tags(client, run_id, {"search.artifacts_pruned": "true"})
    return size




def disk_usage(studies: list[str] | None, tracking_uri: str | None = None,
               workdir: str = "mlruns") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per study, what it keeps under the workdir in MB (kept models, MLflow artifacts, checkpoints, Keras Tuner
    files, reports); then the shared rest (caches, stores). `studies` None: every study MLflow or the workdir knows."""

    uri = existing_tracking_store(tracking_uri, workdir)
    client = connect(uri) if uri else None
    experiments = study_experiments(client) if client else {}
    on_disk = studies_on_disk(workdir)
    if studies is None:
        studies = sorted(set(experiments) | on_disk)
    unknown = [name for name in studies if name not in experiments and name not in on_disk]
    if unknown:
        raise ConfigError(f"no study named {', '.join(map(repr, unknown))} in MLflow store {uri} or under {workdir}/. "
                          f"Known studies: {', '.join(experiments) or 'none'}.")
    rows = []
    for name in studies:
        folders = artifact_folders(client, experiments[name]) if name in experiments else {}
        row = {"study": name, **study_files(workdir, name),
               "artifacts_mb": sum(folder_bytes(path) for path in folders.values()) / MB}
        row["total_mb"] = sum(v for k, v in row.items() if k.endswith("_mb"))
        rows.append(row)
    columns = ["study", "kept_models", "models_mb", "artifacts_mb", "checkpoints_mb", "kerastuner_mb", "reports_mb",
               "total_mb"]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(shared_files(workdir))


def prune_study(name: str, tracking_uri: str | None = None, workdir: str = "mlruns") -> dict:
    """Free a finished study's disk: its kept models except the best trial's, the MLflow artifacts of its pruned
    and failed trials (their runs stay, tagged search.artifacts_pruned), its empty checkpoint folders. Says what
    was removed and the bytes freed; ConfigError for an unknown study or one a process here is still running."""

    uri = existing_tracking_store(tracking_uri, workdir)
    found = connect(uri).get_experiment_by_name(name) if uri else None
    if found is None:
        raise ConfigError(f"no study named '{name}' in MLflow store {resolve_tracking_uri(tracking_uri, workdir)}. "
                          f"Known studies: {', '.join(known_studies(uri)) or 'none'}.")
    client = connect(uri)
    if running := live_runs_here(client, found.experiment_id):
        raise ConfigError(f"study {name} is running (process {', '.join(running)}); prune it once it has stopped")
    trials = client.search_runs([found.experiment_id], filter_string="tags.`search.role` = 'trial'", max_results=50_000,
                                order_by=["metrics.best_val_accuracy DESC", "attributes.start_time ASC"])
    # the leaderboard's choice: the most accurate completed trial within the run's constraints, earliest on ties
    complete = [r for r in trials if r.data.tags.get("search.state") == "COMPLETE"
                and r.data.tags.get("search.feasible") != "False" and "best_val_accuracy" in r.data.metrics]
    best = int(complete[0].data.tags["optuna.trial_number"]) if complete else None
    # without a completed trial no model was kept and none is the best: models are left alone
    models, models_bytes = remove_models_except(workdir, name, best) if best is not None else ([], 0)
    ended = [r for r in trials if r.data.tags.get("search.state") in ("PRUNED", "FAIL")]
    freed = {int(r.data.tags["optuna.trial_number"]): remove_run_artifacts(client, r.info.run_id) for r in ended}
    freed = {n: size for n, size in freed.items() if size}
    return {"study": name, "best_trial": best, "models": models, "models_bytes": models_bytes,
            "artifact_trials": sorted(freed), "artifacts_bytes": sum(freed.values()),
            "checkpoint_folders": remove_empty_folders(Path(workdir).expanduser() / "checkpoints" / name)}


def known_studies(uri: str | None) -> list[str]:
    """The studies (experiments) an MLflow store holds, for messages."""
    return sorted(study_experiments(connect(uri))) if uri else []


def prune_text(done: dict) -> str:
    """What prune_study removed, for people."""
    kept = (f"trial {done['best_trial']}'s model, the best, is kept" if done["best_trial"] is not None
            else "no completed trial: models left as they are")
    trials = ", ".join(map(str, done["artifact_trials"]))
    return "\n".join([
        f"pruned study {done['study']} ({kept}):",
        f"  {len(done['models'])} kept model(s) removed, {done['models_bytes'] / MB:.1f} MB"
        + (f": {', '.join(done['models'])}" if done["models"] else ""),
        f"  artifacts of {len(done['artifact_trials'])} pruned or failed trial(s) removed, "
        f"{done['artifacts_bytes'] / MB:.1f} MB" + (f": trials {trials}" if trials else ""),
        f"  {done['checkpoint_folders']} empty checkpoint folder(s) removed",
        f"freed {(done['models_bytes'] + done['artifacts_bytes']) / MB:.1f} MB"])
