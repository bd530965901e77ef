"""CIFAR-10 in its official python format (`cifar-10-batches-py/`): find a local copy, else download it.

Looked for, in order: `--data-dir` (the folder itself, or holding `cifar-10-batches-py/` or the official
tarball), then Keras's cache, where `keras.datasets.cifar10` keeps it (Keras 3:
`datasets/cifar-10-batches-py-target/cifar-10-batches-py/`, Keras 2: `datasets/cifar-10-batches-py/`),
then the official archive is downloaded into Keras's cache with its MD5 checked.
"""
from __future__ import annotations

import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from runners.digest import file_digest

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def keras_datasets_dir() -> Path:
    """Keras's dataset cache: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "datasets"


def candidate_folders(data_dir: str | Path | None) -> list[Path]:
    """Every place a `cifar-10-batches-py` folder may be, most specific first."""
    places = []
    if data_dir:
        d = Path(data_dir).expanduser()
        places += [d, d / FOLDER, d / "cifar10" / FOLDER, d / f"{FOLDER}-target" / FOLDER]
    cache = keras_datasets_dir()
    places += [cache / f"{FOLDER}-target" / FOLDER, cache / FOLDER]
    return places


def find_cifar10(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding data_batch_1..5 and test_batch; extracts or downloads the archive if needed."""
    for folder in candidate_folders(data_dir):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    target = keras_datasets_dir() / f"{FOLDER}-target"
    for archive in ([Path(data_dir).expanduser() / ARCHIVE] if data_dir else []) + [keras_datasets_dir() / ARCHIVE]:
        if archive.is_file():
            return extract(archive, target)
    if data_dir:
        raise FileNotFoundError(missing_message(data_dir))
    if not download:
        raise FileNotFoundError(missing_message(None))
    try:
        archive = download_archive(keras_datasets_dir() / ARCHIVE)
    except OSError as err:
        raise FileNotFoundError(f"{missing_message(None)}\n(download from {URL} failed: {err})") from None
    return extract(archive, target)


def missing_message(data_dir) -> str:
    """Where the data was looked for and where to put it."""
    where = f"in {data_dir}" if data_dir else f"in Keras's cache ({keras_datasets_dir()})"
    return (f"CIFAR-10 not found {where}. Put the official '{FOLDER}/' folder (or {ARCHIVE} from {URL}) "
            f"there, or pass --data-dir DIR holding it, or run online once so it downloads to "
            f"{keras_datasets_dir()}.")


def download_archive(dest: Path) -> Path:
    """Download the official archive with a progress bar; keep it only if its MD5 matches."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".part")
    with urllib.request.urlopen(URL, timeout=30) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {ARCHIVE}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    if file_digest(partial, "md5") != MD5:
        partial.unlink()
        raise OSError(f"checksum mismatch for {URL}: the download is damaged, try again")
    partial.rename(dest)
    return dest


def extract(archive: Path, target: Path) -> Path:
    """Unpack the official tarball (members checked to stay inside the target)."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / FOLDER


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as (N, 32, 32, 3) uint8 images and int labels."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int32)


def load_cifar10(data_dir: str | Path | None = None) -> dict:
    """Official train (50,000) and test (10,000) images, labels and class names."""
    folder = find_cifar10(data_dir)
    parts = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read_batch(folder / "test_batch")
    return {
        "x_train": np.concatenate([p[0] for p in parts]),
        "y_train": np.concatenate([p[1] for p in parts]),
        "x_test": x_test,
        "y_test": y_test,
        "class_names": CLASS_NAMES,
        "source": str(folder),
    }
