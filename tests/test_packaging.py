"""`pip install .` ships every package and the files the commands read: the wheel built from this checkout holds
the subpackages (search.bench, search.drivers), the shipped spaces and the worker launcher, and nothing of
tests/ or run outputs. The wheel is built from a copy of the source tree, so the checkout gets no build/ or
*.egg-info."""
from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT

SHIPPED = ["search/bench/__main__.py", "search/bench/search.py", "search/drivers/__init__.py",
           "search/local_workers.sh", "spaces/scratch_cnn.yaml", "spaces/transfer.yaml", "runners/protocol.py"]
NOT_SHIPPED = ("tests/", "mlruns/")
# never copied: version control, environments, run outputs and earlier build products
SKIPPED = shutil.ignore_patterns(".git", ".venv", "venv", "mlruns", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "*.pyc")


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SKIPPED)
    # decoys: were they packages, a too-wide package search would ship them
    for folder in ("tests", "mlruns"):
        (source / folder).mkdir(exist_ok=True)
        (source / folder / "__init__.py").touch()
    out = tmp_path / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    # offline with this environment's setuptools; if that is older than [build-system] asks, pip fetches one
    done = subprocess.run([*command, "--no-build-isolation"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        first = done.stdout + done.stderr
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, first + done.stdout + done.stderr
    (wheel,) = out.glob("dogsearch-*.whl")
    return wheel


def test_the_wheel_ships_every_package_and_data_file_and_no_tests_or_run_outputs(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        infos = {info.filename: info for info in wheel.infolist()}
    names = sorted(infos)
    missing = [name for name in SHIPPED if name not in infos]
    assert not missing, f"missing from the wheel: {missing}; it holds {names}"
    extra = [name for name in names if name.startswith(NOT_SHIPPED)]
    assert not extra, f"not meant to be shipped: {extra}"
    mode = infos["search/local_workers.sh"].external_attr >> 16
    assert mode & stat.S_IXUSR, "search/local_workers.sh lost its executable bit"
