"""Scale out, on real processes: workers sharing one study over PostgreSQL or the journal file, a worker
killed mid-trial whose trial a surviving worker retries, and a real `mlflow server` as the tracking store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import TINY_SPACE, write_space
from conftest_postgres import PASSWORD
from search.config import SearchConfig
from search.drivers import run_search
from search.stores import find_study

ROOT = Path(__file__).resolve().parents[1]
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def worker_env(**extra: str) -> dict:
    """The environment of a worker process: this checkout importable, quiet TensorFlow."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1",
            **extra}


def start_worker(folder: Path, name: str, space: Path, cifar: Path, *args: str, **env: str) -> subprocess.Popen:
    """`python -m search.run` on a tiny space in the background, its output in folder/<name>.log."""
    command = [sys.executable, "-m", "search.run", "--space", str(space), "--data-dir", str(cifar),
               "--epochs", "1", "--subset", "200", "--sampler", "random", *args]
    with open(folder / f"{name}.log", "w") as log:
        return subprocess.Popen(command, cwd=folder, env=worker_env(**env), stdout=log, stderr=subprocess.STDOUT)


def wait_for(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes, killing any process still running after the timeout."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def create_stores(storage: str, tracking: str) -> None:
    """Create both databases' tables once, as search/local_workers.sh does before its workers start:
    processes that create one fresh database at the same moment race on its tables."""
    from search.stores import open_storage
    from search.tracking import connect

    open_storage(storage)
    connect(tracking)


def runs_by_role(client: MlflowClient, study: str) -> dict[str, list]:
    """The study experiment's runs, grouped by their search.role tag (invocation, trial)."""
    experiment = client.get_experiment_by_name(study)
    grouped: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        grouped.setdefault(run.data.tags.get("search.role"), []).append(run)
    return grouped


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- three workers, one PostgreSQL study


@pytest.fixture(scope="module")
def three_workers(postgres, cifar_dir, tmp_path_factory):
    """Three worker processes that ran one 6-trial study on PostgreSQL, logging to MLflow on PostgreSQL."""
    folder = tmp_path_factory.mktemp("three-workers")
    space = write_space(folder, TINY_SPACE)
    storage, tracking = postgres.url("optuna"), postgres.url("mlflow")
    create_stores(storage, tracking)
    workers = [start_worker(folder, f"worker-{i}", space, cifar_dir, "--storage", storage, "--tracking-uri",
                            tracking, "--study-name", "three", "--trials", "6") for i in range(3)]
    codes = wait_for(workers, timeout=600)
    logs = [(folder / f"worker-{i}.log").read_text() for i in range(3)]
    return SimpleNamespace(codes=codes, logs=logs, pids={str(w.pid) for w in workers},
                           study=optuna.load_study(study_name="three", storage=storage),
                           client=MlflowClient(tracking))


@pytest.mark.slow
def test_three_workers_run_the_study_total_of_trials_once_each(three_workers):
    assert three_workers.codes == [0, 0, 0], three_workers.logs
    counted = three_workers.study.get_trials(states=COUNTED)
    assert len(counted) == 6
    assert len({t.number for t in counted}) == 6
    assert {str(t.user_attrs["pid"]) for t in counted} <= three_workers.pids


@pytest.mark.slow
def test_every_counted_trial_has_exactly_one_mlflow_run(three_workers):
    trial_runs = runs_by_role(three_workers.client, "three")["trial"]
    numbers = [r.data.tags["optuna.trial_number"] for r in trial_runs]
    for t in three_workers.study.get_trials(states=COUNTED):
        assert numbers.count(str(t.number)) == 1
        assert three_workers.client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    assert all(r.data.tags["search.device"] == "CPU" for r in trial_runs)


@pytest.mark.slow
def test_each_worker_has_its_own_parent_run(three_workers):
    runs = runs_by_role(three_workers.client, "three")
    parents = {r.info.run_id: r.data.tags["search.pid"] for r in runs["invocation"]}
    assert sorted(parents.values()) == sorted(three_workers.pids)
    for run in runs["trial"]:
        assert parents[run.data.tags["mlflow.parentRunId"]] == run.data.tags["search.pid"]


@pytest.mark.slow
def test_the_database_password_is_never_logged(three_workers):
    runs = [r for group in runs_by_role(three_workers.client, "three").values() for r in group]
    recorded = [str(r.data.params) + str(r.data.tags) for r in runs] + three_workers.logs
    assert not [text for text in recorded if PASSWORD in text]
    parent = runs_by_role(three_workers.client, "three")["invocation"][0]
    assert ":***@127.0.0.1" in parent.data.params["storage"]


# ---------------------------------------------------------------- a worker killed mid-trial


def created_study(name: str, storage: str, timeout: float) -> optuna.Study:
    """A study, once a worker has created it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            assert time.monotonic() < deadline, f"no worker created study {name} within {timeout} s"
            time.sleep(0.5)


def running_trial_of(study: optuna.Study, pid: int, timeout: float) -> optuna.trial.FrozenTrial:
    """The trial a worker process is running, once it has started one and opened its MLflow run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            # the pid is recorded before the run is opened: a kill between the two leaves no run to check
            if t.user_attrs.get("pid") == pid and t.user_attrs.get("mlflow_run_id"):
                return t
        time.sleep(0.3)
    raise AssertionError(f"worker {pid} started no trial within {timeout} s")


@pytest.fixture(scope="module")
def killed_worker(postgres, cifar_dir, tmp_path_factory):
    """Two workers on an 8-trial study with a 2 s heartbeat; one is SIGKILLed during its first trial."""
    folder = tmp_path_factory.mktemp("killed-worker")
    space = write_space(folder, TINY_SPACE)
    storage, tracking = postgres.url("optuna"), postgres.url("mlflow")
    create_stores(storage, tracking)
    # enough trials that the survivor is still claiming when the dead trial's heartbeat goes stale (6 s)
    args = ("--storage", storage, "--tracking-uri", tracking, "--study-name", "killed", "--trials", "8")
    victim, survivor = (start_worker(folder, name, space, cifar_dir, *args, SEARCH_HEARTBEAT_SECONDS="2")
                        for name in ("victim", "survivor"))
    try:
        study = created_study("killed", storage, timeout=180)
        killed = running_trial_of(study, victim.pid, timeout=180)
        completed_before = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        code = wait_for([survivor], timeout=400)[0]
        victim.kill()
    trials = {t.number: t for t in study.get_trials()}
    return SimpleNamespace(code=code, log=(folder / "survivor.log").read_text(), survivor=survivor.pid,
                           killed=trials[killed.number], trials=trials, completed_before=completed_before,
                           client=MlflowClient(tracking))


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_by_a_surviving_worker(killed_worker):
    assert killed_worker.code == 0, killed_worker.log
    assert killed_worker.killed.state == TrialState.FAIL
    retries = [t for t in killed_worker.trials.values()
               if t.system_attrs.get("failed_trial") == killed_worker.killed.number]
    assert len(retries) == 1
    assert retries[0].state in COUNTED
    assert retries[0].user_attrs["pid"] == killed_worker.survivor
    assert retries[0].params == killed_worker.killed.params


@pytest.mark.slow
def test_no_completed_trial_is_lost_when_a_worker_dies(killed_worker):
    complete = {n for n, t in killed_worker.trials.items() if t.state == TrialState.COMPLETE}
    assert killed_worker.completed_before <= complete
    assert len([t for t in killed_worker.trials.values() if t.state in COUNTED]) == 8


@pytest.mark.slow
def test_the_killed_trials_mlflow_run_is_continued_by_its_retry_or_closed(killed_worker):
    client, killed = killed_worker.client, killed_worker.killed
    retry = next(t for t in killed_worker.trials.values() if t.system_attrs.get("failed_trial") == killed.number)
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["search.source"] == f"retry:{killed.number}"
    if "resumes" in retry.user_attrs:  # the retry took the killed trial's checkpoint over: one run, continued
        assert retry.user_attrs["resumes"] == killed.number
        assert retry_run.info.run_id == killed.user_attrs["mlflow_run_id"]
        assert retry_run.info.status == "FINISHED" and retry_run.data.tags["optuna.trial_number"] == str(retry.number)
    else:  # killed before its trial had a checkpoint folder: a new run, the killed one closed
        # FAILED when the retry closes it, KILLED when a worker of the same host finds the process gone first
        assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status in ("FAILED", "KILLED")
        assert retry_run.info.run_id != killed.user_attrs["mlflow_run_id"]


# ---------------------------------------------------------------- a real MLflow tracking server


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts; stopped after the test."""
    port, artifacts = free_port(), tmp_path / "server-artifacts"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield SimpleNamespace(url=url, artifacts=artifacts)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: it and its uvicorn
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_a_study_logs_to_a_running_mlflow_server(mlflow_server, cifar_dir, workdir, tiny_space):
    config = SearchConfig(space=str(tiny_space), data_dir=str(cifar_dir), trials=2, epochs=1, subset=200,
                          sampler="random", tracking_uri=mlflow_server.url)
    run_search(config)
    runs = runs_by_role(MlflowClient(mlflow_server.url), "tiny-cifar10")
    assert len(runs["invocation"]) == 1 and len(runs["trial"]) == 2
    assert all(r.info.status == "FINISHED" for r in runs["trial"] + runs["invocation"])
    assert list(mlflow_server.artifacts.rglob("space.yaml"))  # artifacts went through the server
    assert not (workdir / "mlflow.db").exists()


# ---------------------------------------------------------------- N workers on one machine


@pytest.mark.slow
def test_local_workers_share_the_journal_file_by_default(cifar_dir, workdir):
    space = write_space(workdir.parent, TINY_SPACE)
    done = subprocess.run([str(ROOT / "search" / "local_workers.sh"), "2", "--space", str(space), "--data-dir",
                           str(cifar_dir), "--trials", "3", "--epochs", "1", "--subset", "200", "--sampler", "random"],
                          cwd=workdir.parent, env=worker_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    logs = "".join(log.read_text()[-3000:] for log in sorted((workdir / "workers").glob("*.log")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert (workdir / "optuna.journal").is_file() and not (workdir / "optuna.db").exists()
    study = find_study("tiny-cifar10", workdir=str(workdir))
    assert len(study.get_trials(states=COUNTED)) == 3
    parents = runs_by_role(MlflowClient(f"sqlite:///{workdir}/mlflow.db"), "tiny-cifar10")["invocation"]
    assert len(parents) == 2
