"""What a run needs to be reproduced: package versions, the project's git commit, Python and the device."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ["tensorflow", "tensorflow-cpu", "keras", "optuna", "optuna-integration", "mlflow", "numpy",
            "pandas", "albumentations", "opencv-python-headless", "scikit-learn", "keras-tuner", "pillow"]


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a trial's result depends on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the project checkout this code runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def describe_environment(device: dict) -> dict:
    """Everything above plus host, Python and the device description from runners.device."""
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "git_commit": git_commit(), "packages": package_versions(), **device}
