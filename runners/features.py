"""The feature cache: a frozen backbone's pooled outputs for every image, computed once and kept on disk.

With a frozen backbone and no augmentation, the backbone's output for an image never changes, so a head
search needs it once. The cache lives in `<workdir>/cache/features/<key>/`, where the key is a hash of
everything the features depend on: the backbone, the sha256 of its weights, the input size and the images
(their keys, labels and a sample of their pixels). Each split gets four arrays: global-average and
global-max pooled (the head's `pooling` choice picks one), of each photo and of its mirror image (for heads
trained with `augmentation: mirror` and for mirror test-time augmentation; a mirrored photo is as much a
dog of its breed, and its features are not the photo's). The same machinery keeps a backbone's activations
before its last stage (`<workdir>/cache/activations/<key>/`, float16, one kind "activations") for trials
that fine-tune that stage (runners/last_stage.py). `manifest.json` is written LAST with every file's
shape and sha256: a folder without a manifest, or with a file that does not match it (truncated,
overwritten, missing), is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runners.datasets import Dataset
from runners.digest import file_digest

log = logging.getLogger("search")
SPLITS = ("train", "val", "test")
POOLINGS = ("average", "max")  # the kinds of the pooled-feature cache
VIEWS = ("original", "mirror")  # each photo as it is, and flipped left to right
FORMAT = 3  # bump when the layout changes: old caches then get new keys


@dataclass
class FeatureSet:
    """Pooled features of every split, where they came from, and whether this call computed them."""

    key: str
    folder: Path
    arrays: dict[tuple[str, str, str], np.ndarray]   # (split, kind, view) -> (N, ...): pooled float32 (N, D)
    labels: dict[str, np.ndarray]
    built: bool
    build_seconds: float
    images_per_second: float

    def split(self, name: str, kind: str, view: str = "original") -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of one split for one kind (a pooling), of the photos or of their mirror images."""
        return self.arrays[(name, kind, view)], self.labels[name]


def data_fingerprint(data: Dataset) -> str:
    """Which images, with which labels and pixels: keys, labels and every 8th pixel row and column."""
    digest = hashlib.sha256(f"{data.name}|{data.image_size}|{'|'.join(data.class_names)}".encode())
    for split in SPLITS:
        x, y = data.splits[split]
        digest.update("\n".join(data.keys[split]).encode())
        digest.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(x[:, ::8, ::8, :]).tobytes())
    return digest.hexdigest()


def cache_key(backbone: str, weights_sha256: str, image_size: int, data: Dataset) -> str:
    """Changes when the backbone, its weights, the input size or the images change."""
    text = f"v{FORMAT}|{backbone}|{weights_sha256}|{image_size}|{data_fingerprint(data)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_features(workdir: str | Path, key: str, data: Dataset, embed, kinds: tuple = POOLINGS,
                    cache: str = "features") -> FeatureSet:
    """The arrays under `<workdir>/cache/<cache>/<key>`, loaded and verified; computed with `embed(images) -> one
    array per kind` (by default (average, max)) if absent or damaged."""
    folder = Path(workdir) / "cache" / cache / key
    labels = {split: np.asarray(data.splits[split][1]) for split in SPLITS}
    found = load_verified(folder, labels)
    if found is not None:
        arrays, manifest = found
        return FeatureSet(key, folder, arrays, labels, False, manifest["build_seconds"], manifest["images_per_second"])
    return build(folder, key, data, labels, embed, kinds)


def cached_rate(workdir: str | Path, key: str, cache: str = "features") -> float | None:
    """Images per second the build of the arrays under `key` embedded at, or None when not built (or unreadable)."""
    try:
        return float(json.loads((Path(workdir) / "cache" / cache / key / "manifest.json").read_text())
                     ["images_per_second"])
    except (OSError, ValueError, KeyError):
        return None


def load_verified(folder: Path, labels: dict[str, np.ndarray]):
    """(arrays, manifest) when every file matches the manifest and the labels, else None (with the reason logged)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        if folder.exists():
            log.warning(f"{folder.parent.name} cache {folder.name}: no manifest (an interrupted build); rebuilding")
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        arrays = {}
        for name, entry in manifest["files"].items():
            path = folder / name
            problem = file_problem(path, entry, len(labels[entry["split"]]))
            if problem:
                log.warning(f"{folder.parent.name} cache {folder.name}: {name} {problem}; rebuilding")
                return None
            arrays[(entry["split"], entry["kind"], entry["view"])] = np.load(path, mmap_mode="r")
        return arrays, manifest
    except (OSError, ValueError, KeyError) as err:
        log.warning(f"{folder.parent.name} cache {folder.name}: unreadable ({type(err).__name__}: {err}); rebuilding")
        return None


def file_problem(path: Path, entry: dict, rows: int) -> str | None:
    """Why a cached array cannot be used (missing, wrong row count, wrong shape, wrong checksum), or None."""
    if not path.is_file():
        return "is missing"
    if entry["shape"][0] != rows:
        return f"has {entry['shape'][0]} rows for {rows} images"
    if path.stat().st_size != entry["bytes"]:
        return f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if file_digest(path) != entry["sha256"]:
        return "does not match its checksum"
    if list(np.load(path, mmap_mode="r").shape) != entry["shape"]:
        return "has the wrong shape"
    return None


def build(folder: Path, key: str, data: Dataset, labels: dict, embed, kinds: tuple = POOLINGS) -> FeatureSet:
    """Embed every split and its mirror image, write the arrays, then the manifest (last, atomically)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    arrays, files = {}, {}
    for split in SPLITS:
        for view in VIEWS:
            images = data.splits[split][0]
            embedded = embed(images[:, :, ::-1] if view == "mirror" else images)
            for kind, values in zip(kinds, embedded):
                name = f"{split}_{kind}_{view}.npy"
                values = np.ascontiguousarray(values)  # its own dtype: float32 features, float16 activations
                np.save(folder / name, values)
                files[name] = {"split": split, "kind": kind, "view": view, "shape": list(values.shape),
                               "bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
                arrays[(split, kind, view)] = values
    seconds = time.perf_counter() - started
    images = len(VIEWS) * sum(len(v) for v in labels.values())
    manifest = {"key": key, "files": files, "build_seconds": seconds, "images": images,
                "images_per_second": images / max(seconds, 1e-9), "dataset": data.name,
                "image_size": data.image_size}
    partial = folder / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, folder / "manifest.json")
    log.info(f"{folder.parent.name} cache {key}: embedded {images:,} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} images/s)")
    return FeatureSet(key, folder, arrays, labels, True, seconds, images / max(seconds, 1e-9))
