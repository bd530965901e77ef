"""Datasets as uint8 image arrays split into train / validation / test, the same way for every study.

Splits (shared/notes/conventions.md): official splits are kept (CIFAR-10's test set, Stanford Dogs'
`lists/` when present). Where a split must be made, each image's side is decided by a stable hash of its
relative path alone, so every study, subset and breed selection agrees on which images are test; only
then are `--subset` and `--breeds` applied. Decoded photos are cached under the workdir, keyed by their
inputs, and read back memory-mapped (in memory when they fit, paged from disk when they do not).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split


VAL_FRACTION = 0.1   # of the training part, for every dataset
TEST_FRACTION = 0.2  # of all images, where no official test split exists
SUBSET_SEED = 0      # one subset for every study, so subsets agree across studies


@dataclass
class Dataset:
    """Images (N, H, W, 3) uint8 and int labels for each split, with the names people read."""

    name: str
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    keys: dict[str, list[str]]
    image_size: int
    source: str
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    class_ids: list[str] = field(default_factory=list)

    def digest(self, split: str) -> str:
        """A short hash of which images a split holds, for MLflow's dataset inputs."""
        return hashlib.sha256("\n".join(self.keys[split]).encode()).hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {name: len(y) for name, (_, y) in self.splits.items()}


# ---------------------------------------------------------------- splits


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a relative path (same on every machine and Python)."""
    return int(hashlib.md5(key.encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_sides(keys: list[str], official: np.ndarray | None = None) -> np.ndarray:
    """'train', 'val' or 'test' for each key: official test kept, the rest decided by the key's hash."""
    u = np.array([hash_fraction(k) for k in keys])
    if official is not None:
        sides = np.where(official == "test", "test", np.where(u < VAL_FRACTION, "val", "train"))
    else:
        val_edge = TEST_FRACTION + VAL_FRACTION * (1 - TEST_FRACTION)
        sides = np.where(u < TEST_FRACTION, "test", np.where(u < val_edge, "val", "train"))
    return sides.astype(object)


def take_subset(x: np.ndarray, y: np.ndarray, keys: list[str], n: int | None):
    """At most n images, stratified by class, the same n for every study."""
    if n is None or len(y) <= n:
        return x, y, keys
    index = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and n >= len(counts[counts > 0]) else None
    chosen, _ = train_test_split(index, train_size=n, stratify=stratify, random_state=SUBSET_SEED)
    chosen = np.sort(chosen)
    return x[chosen], y[chosen], [keys[i] for i in chosen]


def with_split_subset(data: Dataset, split: str, n: int) -> Dataset:
    """The same data with at most n images in one split (stratified, the same n for every trial): an explored
    trial's fewer training images per epoch, or fewer validation images; the other splits untouched."""
    x, y, keys = take_subset(*data.splits[split], data.keys[split], n)
    if len(y) == len(data.splits[split][1]):
        return data
    return replace(data, splits={**data.splits, split: (x, y)}, keys={**data.keys, split: keys})


# ---------------------------------------------------------------- loading


def load_dataset(name: str, *, data_dir=None, image_size: int = 32, subset: int | None = None,
                 breeds=None, crop: bool = False, workdir: str | Path = "mlruns") -> Dataset:
    """`cifar10`, `stanford_dogs` or `folder:PATH` at one image size, split and subset."""
    if name == "cifar10":
        return load_cifar10_dataset(data_dir, image_size, subset)
    if name == "stanford_dogs":
        from runners import photos

        listing = photos.list_stanford_dogs(photos.find_stanford_dogs(data_dir), breeds=breeds)
    elif name.startswith("folder:"):
        from runners import photos

        root = Path(name.split(":", 1)[1]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"photo folder {root} does not exist; --dataset folder:PATH takes a folder "
                                    "with one sub-folder of photos per class")
        listing = photos.list_photo_folder(root, classes=breeds)
    else:
        raise ValueError(f"unknown dataset '{name}'; available: cifar10, stanford_dogs, folder:PATH")
    return load_photo_dataset(name, listing, image_size, subset, crop, Path(workdir))


def load_cifar10_dataset(data_dir, image_size: int, subset: int | None) -> Dataset:
    """CIFAR-10: official test set; validation carved from train by the hash of each image's key."""
    from runners.cifar10 import load_cifar10

    raw = load_cifar10(data_dir)
    train_keys = [f"train/{i:05d}" for i in range(len(raw["y_train"]))]
    sides = split_sides(train_keys, official=np.full(len(train_keys), "train", dtype=object))
    splits, keys = {}, {}
    for side in ("train", "val"):
        mask = sides == side
        chosen = [k for k, m in zip(train_keys, mask) if m]
        splits[side], keys[side] = (raw["x_train"][mask], raw["y_train"][mask]), chosen
    splits["test"] = (raw["x_test"], raw["y_test"])
    keys["test"] = [f"test/{i:05d}" for i in range(len(raw["y_test"]))]
    for side in splits:
        x, y, keys[side] = take_subset(*splits[side], keys[side], subset)
        splits[side] = (resize_all(x, image_size), y)
    return Dataset("cifar10", raw["class_names"], splits, keys, image_size, raw["source"],
                   class_ids=list(raw["class_names"]))


def resize_all(x: np.ndarray, size: int) -> np.ndarray:
    """Images at size x size (no-op when they already are)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    import cv2

    return np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in x])


def load_photo_dataset(name: str, listing, image_size: int, subset: int | None, crop: bool,
                       workdir: Path) -> Dataset:
    """Photos decoded once into a cache, then split by hash (or the official lists) and subset."""
    images, kept, bad = cached_images(listing, image_size, crop, workdir)
    paths = [listing.paths[i] for i in kept]
    labels = np.asarray(listing.labels)[kept].astype(np.int32)
    sides = split_sides(paths, official_of(listing, kept))
    splits, keys = {}, {}
    for side in ("train", "val", "test"):
        index = np.flatnonzero(sides == side)
        x = images[contiguous(index)]  # the cache is stored split by split: a view of the memory map, no copy
        x, y, k = take_subset(x, labels[index], [paths[i] for i in index], subset)
        splits[side], keys[side] = (x, y), k
    return Dataset(name, list(listing.class_names), splits, keys, image_size, str(listing.root), bad,
                   class_ids=list(listing.class_ids))


def official_of(listing, index: np.ndarray) -> np.ndarray | None:
    """The official train/test side of the listed images at these indices, if the data set has one."""
    return None if listing.official_split is None else np.asarray(listing.official_split)[index]


def contiguous(index: np.ndarray):
    """A slice when the indices are one run (a view of a memory map), else the indices themselves (a copy)."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def split_order(listing) -> np.ndarray:
    """Listing indices ordered train, val, test (stable), so each split is one run of the cache."""
    sides = split_sides(listing.paths, official_of(listing, np.arange(len(listing.paths))))
    rank = np.select([sides == "train", sides == "val"], [0, 1], 2)
    return np.argsort(rank, kind="stable")


def cached_images(listing, image_size: int, crop: bool, workdir: Path):
    """Decoded, resized images of a listing from the cache; decoded and written there on first use.

    Returns the images, the listing index of each (split by split) and the files that were skipped."""
    from runners import photos

    key = cache_key(listing, image_size, crop)
    folder = workdir / "cache" / "images" / key
    done = folder / "index.json"
    if done.is_file():
        index = json.loads(done.read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        return images, np.asarray(index["kept"], dtype=np.int64), [tuple(b) for b in index["bad"]]
    order = split_order(listing)
    boxes = listing.boxes if crop else None
    images, kept, bad = photos.load_images(listing.root, [listing.paths[i] for i in order], image_size, boxes=boxes,
                                           progress=True)  # minutes for a large folder: a line a minute in a log
    kept = order[kept]
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    del images  # read back memory-mapped below: the decoded copy need not stay resident
    # index.json is written last: a cache without it was interrupted and is rebuilt, never used
    done.write_text(json.dumps({"kept": [int(i) for i in kept], "bad": [list(b) for b in bad],
                                "root": str(listing.root), "size": image_size, "crop": crop}))
    return np.load(folder / "images.npy", mmap_mode="r"), np.asarray(kept, dtype=np.int64), list(bad)


def cache_key(listing, image_size: int, crop: bool) -> str:
    """Changes when the files, their sizes or times, the image size or cropping change."""
    digest = hashlib.sha256(f"split-ordered|{Path(listing.root).resolve()}|{image_size}|{crop}".encode())
    for rel in listing.paths:
        stat = (Path(listing.root) / rel).stat()
        digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]
