"""MLflow tracking: one experiment per study, one parent run per process, one nested run per trial.

Every call goes through `MlflowClient` with explicit run ids, so several trials, threads or workers never
depend on a global "active run". Per-epoch metrics go in one `log_batch` call per epoch (100 single
`log_metric` calls cost ~0.45 s on SQLite, one batch ~0.015 s; shared/notes/stack.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from runners.console import logger_level
from search.errors import ConfigError
from search.config import SYSTEM_METRICS_SECONDS
from search.stores import redact

ROLE = "search.role"  # 'invocation' (parent), 'trial', 'ensemble' (search/ensemble.py), or 'study' (the report run)


# A tracking server is asked once, quickly: MLflow's defaults (7 retries with back-off, 120 s per request) would
# keep a user waiting for minutes before "cannot be reached". Trials later log with MLflow's own defaults.
SERVER_CHECK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "4"}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for one block, then restore them as they were."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def server_check():
    """MLflow's HTTP settings for one quick question to a tracking server (SERVER_CHECK), quietly."""
    with environment(SERVER_CHECK), logger_level("urllib3.connectionpool", logging.ERROR):
        yield


def connect(tracking_uri: str, attempts: int = 3) -> MlflowClient:
    """A client for the tracking store, checked to answer now (ConfigError if it does not).

    Workers started together race to create a new database's tables; the loser retries after a pause. A
    tracking server (http, https) gets one short try instead: an answer, or a ConfigError, within ~10 s."""
    server = tracking_uri.startswith(("http://", "https://"))
    if server:
        attempts = 1
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            client = MlflowClient(tracking_uri)
            with server_check() if server else contextlib.nullcontext():
                client.search_experiments(max_results=1)
            return client
        except Exception as err:  # any driver or HTTP error means the same thing to a user
            if attempt + 1 < attempts:
                time.sleep(2 + attempt * 2)
                continue
            raise ConfigError(f"MLflow tracking store {redact(tracking_uri)} cannot be reached: "
                              f"{type(err).__name__}: {short_reason(err)}. Check --tracking-uri "
                              "(default sqlite:///mlruns/mlflow.db) or MLFLOW_TRACKING_URI.") from None


def short_reason(err: Exception) -> str:
    """The gist of a driver's or HTTP library's error: its first line, or only the socket's complaint from
    urllib3's nested retry story ("[Errno 111] Connection refused", "Read timed out. (read timeout=4)")."""
    text = str(err).splitlines()[0] if str(err) else ""
    if "(Caused by " in text:
        text = re.sub(r"[\"']\)+$", "", text.split("(Caused by ", 1)[1].rsplit(": ", 1)[-1])
    return text[:300]


# The experiment tag MLflow 3's UI reads to choose its view: without it an experiment opens on the GenAI pages
# (traces, token usage); with it, on the runs, their charts and the model registry.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, study: str, artifact_root: str | None) -> str:
    """The study's experiment, created on first use with its artifacts under artifact_root, and marked as model
    training (an older experiment without that mark gets it)."""
    found = client.get_experiment_by_name(study)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        mark_model_training(client, found)
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(study, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        # another worker created it between our look-up and our insert: use theirs
        found = client.get_experiment_by_name(study)
        if found is None:
            raise
        mark_model_training(client, found)
        return found.experiment_id


def mark_model_training(client: MlflowClient, experiment) -> None:
    """Tag an experiment as model training (EXPERIMENT_KIND) unless it already says what it is."""
    if "mlflow.experimentKind" not in experiment.tags:
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)


def study_experiments(client: MlflowClient) -> dict[str, str]:
    """The studies a store holds: experiment name -> id, MLflow's own "Default" left out."""
    return {e.name: e.experiment_id for e in client.search_experiments() if e.name != "Default"}


def start_parent_run(client: MlflowClient, exp_id: str, study: str, settings: dict, environment: dict,
                     space_text: str, space_resolved: dict) -> str:
    """The run of this process: what it was asked to do, the space file and the environment."""
    host, pid = socket.gethostname(), os.getpid()
    run = client.create_run(exp_id, run_name=f"{study} {host}:{pid}", tags={
        ROLE: "invocation", "optuna.study": study, "search.host": host, "search.pid": str(pid),
        "search.git_commit": str(environment.get("git_commit")), "search.device": environment.get("device", ""),
        "search.mixed_precision": str(environment.get("mixed_precision", False))})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in settings.items()])
    log_text(client, run_id, space_text, "space.yaml")
    log_text(client, run_id, json.dumps(space_resolved, indent=2, default=str), "space_resolved.json")
    log_text(client, run_id, json.dumps(environment, indent=2, default=str), "environment.json")
    return run_id


def start_trial_run(client: MlflowClient, exp_id: str, parent_id: str, study: str, number: int,
                    params: dict, context: dict, tags: dict | None = None) -> str:
    """A trial's run, nested under the parent, with every parameter (flat names) and its context."""
    run = client.create_run(exp_id, run_name=f"trial-{number}", tags={
        "mlflow.parentRunId": parent_id, ROLE: "trial", "optuna.study": study,
        "optuna.trial_number": str(number), "search.state": "RUNNING",
        "search.host": socket.gethostname(), "search.pid": str(os.getpid()), **(tags or {})})
    run_id = run.info.run_id
    values = {**params, **context}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in values.items()])
    return run_id


def start_ensemble_run(client: MlflowClient, exp_id: str, parent_id: str, study: str, metrics: dict,
                       tags: dict) -> str:
    """The ensemble's run, nested under the parent, with its scores and members (search/ensemble.py)."""
    run = client.create_run(exp_id, run_name="ensemble", tags={
        "mlflow.parentRunId": parent_id, ROLE: "ensemble", "optuna.study": study, **tags})
    log_metrics(client, run.info.run_id, metrics)
    return run.info.run_id


def reopen_trial_run(client: MlflowClient, run_id: str, parent_id: str, number: int, tags: dict) -> None:
    """Continue an interrupted trial's run in this process: RUNNING again, under this process's parent run.

    It now belongs to the Optuna trial `number` that continues it (the tags say which one it resumes)."""
    client.update_run(run_id, status="RUNNING")
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.delete_tag(run_id, "search.reason")  # why it stopped no longer holds
    set_tags(client, run_id, {**tags, "mlflow.parentRunId": parent_id, "optuna.trial_number": number,
                              "search.state": "RUNNING", "search.host": socket.gethostname(),
                              "search.pid": os.getpid()})


def log_datasets(client: MlflowClient, run_id: str, data) -> None:
    """Record which images each split held (name, split, digest) with mlflow's dataset inputs."""
    inputs = [DatasetInput(MlflowDataset(name=data.name, digest=data.digest(split), source_type="local",
                                         source=json.dumps({"uri": data.source, "split": split,
                                                            "images": len(data.keys[split])})),
                           tags=[InputTag("mlflow.data.context", split)])
              for split in ("train", "val", "test")]
    client.log_inputs(run_id, datasets=inputs)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int = 0) -> None:
    """Numbers in one batched call."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                      if v is not None])


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    """Tags in one batched call."""
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, name: str) -> None:
    """A text artifact."""
    client.log_text(run_id, text, name)


def finish_trial_run(client: MlflowClient, run_id: str, state: str, reason: str | None = None) -> None:
    """End a trial's run: COMPLETE and PRUNED finish, FAIL fails, KILLED is killed; the state is a tag."""
    tags = {"search.state": state}
    if reason:
        tags["search.reason"] = reason
    set_tags(client, run_id, tags)
    status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}[state]
    client.set_terminated(run_id, status)


def log_missing_epochs(client: MlflowClient, run_id: str, history: dict[str, list[float]]) -> None:
    """Log the epochs of a checkpoint's history that the run lacks, each at its step (epoch from 1)."""
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    for step in range(1, len(history.get("val_accuracy", [])) + 1):
        if step not in logged:
            log_metrics(client, run_id, {k: values[step - 1] for k, values in history.items()}, step=step)


@contextlib.contextmanager
def fluent_api(uri: str):
    """Point mlflow's module-level API at a store for one block, then restore the caller's setting.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, which would leak this
    store into every later search in the same process."""
    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def requirements() -> list[str]:
    """The packages a logged model needs to load, pinned to the versions that trained it."""
    from importlib import metadata

    pins = []
    for name in ("keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow", "mlflow"):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def log_keras_model(client: MlflowClient, run_id: str, model, name: str = "model") -> str:
    """Log a trained Keras model to a run (MLflow's keras flavour); returns its model URI."""
    import numpy as np
    from mlflow.models import infer_signature

    example = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, model.output_shape[-1]), dtype=np.float32))
    with fluent_api(client.tracking_uri), mlflow.start_run(run_id=run_id, nested=True):
        # explicit requirements: inferring them loads the model again in a subprocess (~20 s on 2 cores)
        info = mlflow.keras.log_model(model, name=name, signature=signature, pip_requirements=requirements())
    return info.model_uri


def open_runs(client: MlflowClient, exp_id: str) -> list:
    """Runs of an experiment still marked RUNNING."""
    return client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)


def close_orphans(client: MlflowClient, exp_id: str, live: set[tuple[str, str]]) -> int:
    """Mark KILLED the RUNNING runs whose process (host, pid) is gone: nothing stays open after a crash."""
    closed = 0
    host = socket.gethostname()
    for run in open_runs(client, exp_id):
        tags = run.data.tags
        owner = (tags.get("search.host"), tags.get("search.pid"))
        if owner[0] == host and owner not in live and not pid_alive(owner[1]):
            if tags.get(ROLE) == "trial":
                finish_trial_run(client, run.info.run_id, "KILLED", "its process ended without closing it")
            else:
                client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


def live_runs_here(client: MlflowClient, exp_id: str) -> list[str]:
    """The pids of this machine's processes that still have a run of the experiment open."""
    host = socket.gethostname()
    return sorted({run.data.tags.get("search.pid", "?") for run in open_runs(client, exp_id)
                   if run.data.tags.get("search.host") == host and pid_alive(run.data.tags.get("search.pid"))})


def pid_alive(pid: str | None) -> bool:
    """True when a process with this pid exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def start_system_metrics(run_id: str, tracking_uri: str, interval: float = SYSTEM_METRICS_SECONDS):
    """Record the machine's CPU, memory, disk and network use on a run (MLflow's `system/...` metrics, one
    point every `interval` s) from a background thread, until `stop_system_metrics`. None when it cannot start
    (psutil missing, ...): a trial never fails for want of these figures."""
    import logging

    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring ..." per trial
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=tracking_uri)
        monitor.start()
    except Exception:
        return None
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor from `start_system_metrics` and log what it still holds (None: nothing to do).

    Call it before the run is ended: the monitor's thread also stops by itself once its run is no longer
    RUNNING, but only at its next sample."""
    if monitor is None:
        return
    with contextlib.suppress(Exception):
        monitor.finish()


def temp_artifact_dir() -> tempfile.TemporaryDirectory:
    """A scratch folder for files that are logged as artifacts and then deleted."""
    return tempfile.TemporaryDirectory(prefix="search-artifacts-")
