"""optuna-dashboard reads a real study from the default store, as docs/ui.md tells a user to start it."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY_SPACE, write_space


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def dashboard_command() -> list[str]:
    """`optuna-dashboard` from this interpreter's environment (else PATH)."""
    found = Path(sys.executable).with_name("optuna-dashboard")
    return [str(found)] if found.is_file() else [shutil.which("optuna-dashboard") or "optuna-dashboard"]


def test_optuna_dashboard_serves_the_study_a_search_wrote(tmp_path, cifar_dir):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install 'dogsearch[dashboard]')")
    space = write_space(tmp_path, TINY_SPACE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_HOME": str(tmp_path / "keras_home")}
    done = subprocess.run([sys.executable, "-m", "search.run", "--space", str(space), "--data-dir", str(cifar_dir),
                           "--trials", "2", "--epochs", "1", "--subset", "200", "--timeout", "0", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr

    port = free_port()
    server = subprocess.Popen([*dashboard_command(), "sqlite:///mlruns/optuna.db", "--port", str(port),
                               "--host", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, summaries = time.time() + 60, None
        while summaries is None:
            try:
                summaries = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, f"optuna-dashboard exited: {server.stdout.read()}"
                assert time.time() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in summaries] == ["tiny-cifar10"]
        study = get_json(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}")
        assert study["name"] == "tiny-cifar10"
        assert len(study["trials"]) == 2
        assert {t["state"] for t in study["trials"]} <= {"Complete", "Pruned"}
        best = study["best_trials"][0]
        assert 0.0 <= float(best["values"][0]) <= 1.0  # validation accuracy, as the search reported it
        assert "learning_rate" in {p["name"] for p in best["params"]}
        assert any(a["key"] == "mlflow_run_id" for a in best["user_attrs"])  # the way to the trial's MLflow run
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
