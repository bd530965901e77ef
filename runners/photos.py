"""Read photo libraries robustly: Stanford Dogs in its official layout, or any class-per-sub-folder tree.

Listing is separate from decoding. `list_stanford_dogs` and `list_photo_folder` only walk folders and
return a `PhotoListing` (relative paths, labels, names, and the official split and bounding boxes when
the data set ships them); `load_images` then decodes, converts and resizes with a thread pool and skips
bad files by name instead of failing the whole run. `find_stanford_dogs` and `download_stanford_dogs`
locate or fetch the official archives.

Resizing: JPEGs are first decoded at a reduced DCT scale (libjpeg's 1/2, 1/4 or 1/8, never below the
target size, via `Image.draft`), then every image is resized to size x size with Pillow's BILINEAR filter,
which is antialiased when shrinking. Aspect ratio is not kept, the same as the shared 224x224 copy.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import math
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

STANFORD_DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"

# Stanford publishes no checksums. These sizes and SHA-256 digests are the ones TensorFlow Datasets
# recorded for the same URLs (tensorflow_datasets/url_checksums/stanford_dogs.txt); no MD5 is known.
# Each archive maps to (folder it provides under the data set root, size in bytes, sha256).
STANFORD_DOGS_ARCHIVES: dict[str, tuple[str, int | None, str | None]] = {
    "images.tar": (
        "Images",
        793_579_520,
        "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
    ),
    "annotation.tar": (
        "Annotation",
        21_852_160,
        "662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd",
    ),
    # lists.tar holds file_list.mat, train_list.mat and test_list.mat at its top level, not in lists/.
    "lists.tar": (
        "lists",
        481_280,
        "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",
    ),
}

_WNID_PREFIX = re.compile(r"^n\d{8}-")
# Numbered class folders such as "001.Affenpinscher" (a common re-packaging of dog data sets).
_NUMBER_PREFIX = re.compile(r"^\d+\.")
_WNID = re.compile(r"^(n\d{8})-")

# Folders a zip made on macOS leaves behind; never a class.
_JUNK_FOLDERS = {"__MACOSX"}

# EXIF orientation -> the transpose that shows the photo upright (the table ImageOps.exif_transpose uses).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Formats photos come in. Pillow's other readers would turn stray files into pictures or worse: TGA has no
# signature and accepts some binary junk, EPS runs Ghostscript. HEIF appears when pillow-heif is registered.
_PHOTO_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "AVIF", "HEIF", "JPEG2000", "PPM")

Box = tuple[int, int, int, int]


@dataclass
class PhotoListing:
    """The photos of a class-per-folder data set, before any decoding."""

    root: Path  # the paths are relative to it; Images/ for Stanford Dogs, so they read as in lists/*.mat
    paths: list[str]  # posix, grouped by class in folder order, sorted within each class
    labels: np.ndarray  # int32 index into class_ids
    class_names: list[str]  # for people: "Japanese spaniel"
    class_ids: list[str]  # raw folder names: "n02085782-Japanese_spaniel"
    official_split: np.ndarray | None = None  # "train"/"test" per path ("" in neither list); None without lists
    boxes: dict[str, Box] | None = None  # path -> largest (xmin, ymin, xmax, ymax) in stored pixels


class BadPhotoError(ValueError):
    """A file that cannot be used as a photo; the message is the short reason."""


# ---------------------------------------------------------------------------------------------------
# Names and class selection


def clean_breed_name(folder: str) -> str:
    """Name shown to people for a class folder: "n02085782-Japanese_spaniel" -> "Japanese spaniel"."""
    name = _NUMBER_PREFIX.sub("", _WNID_PREFIX.sub("", folder))
    return " ".join(name.replace("_", " ").split()) or folder


def _name_key(name: str) -> str:
    # Users type "japanese spaniel", "Japanese_spaniel" or "Japanese Spaniel" for the same breed.
    return " ".join(name.replace("_", " ").lower().split())


def _class_keys(class_id: str) -> set[str]:
    keys = {_name_key(class_id), _name_key(clean_breed_name(class_id))}
    wnid = _WNID.match(class_id)
    if wnid:
        keys.add(wnid.group(1).lower())
    return keys


def _suggestions(wanted: str, class_ids: Sequence[str]) -> list[str]:
    names = [clean_breed_name(c) for c in class_ids]
    key = _name_key(wanted)
    by_key = {_name_key(n): n for n in names}
    # Substrings catch "poodle" -> the three poodles, which a similarity ratio can miss.
    hits = [n for n in names if key and key in _name_key(n)]
    hits += [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=5, cutoff=0.6)]
    return list(dict.fromkeys(hits))


def _unknown_name_message(wanted: str, class_ids: Sequence[str], kind: str) -> str:
    close = _suggestions(wanted, class_ids)
    if close:
        return f"unknown {kind} {wanted!r}; did you mean: {', '.join(close)}?"
    names = [clean_breed_name(c) for c in class_ids]
    shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
    return f"unknown {kind} {wanted!r}; {len(names)} available: {shown}"


def _as_selection(wanted: int | str | Iterable[str] | None) -> int | list[str] | None:
    if wanted is None:
        return None
    if isinstance(wanted, bool):
        raise TypeError("a class selection is a count or a list of names, not a bool")
    if isinstance(wanted, (int, np.integer)):
        return int(wanted)
    # A bare string is one CLI value ("5" or "Chihuahua,pug"), not an iterable of letters.
    if isinstance(wanted, str):
        text = wanted.strip()
        return int(text) if text.isdigit() else [part for part in text.split(",") if part.strip()]
    return [str(name) for name in wanted]


def _select_classes(class_ids: Sequence[str], wanted, kind: str) -> list[str]:
    selection = _as_selection(wanted)
    if selection is None:
        return list(class_ids)
    if isinstance(selection, int):
        if not 1 <= selection <= len(class_ids):
            raise ValueError(f"asked for {selection} {kind}s; there are {len(class_ids)}")
        return list(class_ids[:selection])
    if not selection:
        raise ValueError(f"empty {kind} selection")
    keys = {class_id: _class_keys(class_id) for class_id in class_ids}
    chosen: set[str] = set()
    for name in selection:
        matches = {c for c, k in keys.items() if _name_key(name) in k}
        if not matches:
            raise ValueError(_unknown_name_message(name, class_ids, kind))
        chosen |= matches
    # Folder order, not request order, so "a,b" and "b,a" train the same label numbering.
    return [c for c in class_ids if c in chosen]


def _display_names(class_ids: Sequence[str]) -> list[str]:
    names = [clean_breed_name(c) for c in class_ids]
    clashes = {n for n in names if names.count(n) > 1}
    # Two folders that clean to one name ("golden_retriever", "golden retriever") keep their raw names.
    return [c if n in clashes else n for c, n in zip(class_ids, names)]


# ---------------------------------------------------------------------------------------------------
# Walking folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_folders(root: Path) -> list[str]:
    with os.scandir(root) as entries:
        folders = [
            e.name
            for e in entries
            if e.is_dir() and not _is_hidden(e.name) and e.name not in _JUNK_FOLDERS
        ]
    return sorted(folders)


def _files_below(folder: Path) -> Iterator[str]:
    """Yield the posix paths, relative to folder, of every visible regular file at any depth."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop would otherwise walk forever
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _is_hidden(d) and d not in _JUNK_FOLDERS]
        for name in filenames:
            full = os.path.join(dirpath, name)
            # isfile drops broken links, sockets and FIFOs (reading a FIFO would block forever).
            if not _is_hidden(name) and os.path.isfile(full):
                yield Path(os.path.relpath(full, folder)).as_posix()


def _list_classes(root: Path, wanted, kind: str) -> PhotoListing:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"photo folder {root} does not exist")
    files = {c: sorted(f"{c}/{f}" for f in _files_below(root / c)) for c in _class_folders(root)}
    class_ids = [c for c, f in files.items() if f]  # an empty folder is not a class
    if not class_ids:
        raise ValueError(f"{root} holds no class folders with files in them")
    class_ids = _select_classes(class_ids, wanted, kind)
    paths = [p for c in class_ids for p in files[c]]
    labels = np.repeat(np.arange(len(class_ids), dtype=np.int32), [len(files[c]) for c in class_ids])
    return PhotoListing(root, paths, labels, _display_names(class_ids), class_ids)


def list_photo_folder(root: str | os.PathLike, classes=None) -> PhotoListing:
    """List a class-per-sub-folder tree; classes is None, a count, or names (folder or clean)."""
    return _list_classes(Path(root), classes, "class")


# ---------------------------------------------------------------------------------------------------
# Stanford Dogs: official split and bounding boxes


def _mat_text(value) -> str:
    # loadmat wraps each cell in nested arrays; dig down to the one string inside.
    while isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.ravel()[0]
    return str(value).replace("\\", "/")


def _read_split_list(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # losing the official split silently would change every test score
        raise ValueError(f"cannot read the official split list {path}: {error}") from error
    files = [_mat_text(v) for v in np.atleast_1d(mat["file_list"]).ravel()]
    labels = np.atleast_1d(mat["labels"]).astype(np.int64).ravel() if "labels" in mat else np.zeros(0)
    return files, labels


def _check_list_labels(files: list[str], labels: np.ndarray, source: Path) -> None:
    # The .mat labels are redundant with the folders (which give our labels after any selection);
    # disagreement means the lists belong to another copy of the data, worth a warning.
    if len(labels) != len(files):
        return
    folders: dict[int, set[str]] = {}
    for f, label in zip(files, labels):
        folders.setdefault(int(label), set()).add(f.split("/")[0])
    if any(len(names) > 1 for names in folders.values()):
        warnings.warn(f"{source}: labels disagree with the folders of file_list", stacklevel=3)


def _lists_folder(root: Path) -> Path | None:
    # `tar -xf lists.tar -C root` drops the .mat files straight into root.
    for folder in (root / "lists", root):
        if (folder / "train_list.mat").is_file() or (folder / "test_list.mat").is_file():
            return folder
    return None


def _official_split(root: Path, paths: Sequence[str]) -> np.ndarray | None:
    folder = _lists_folder(root)
    if folder is None:
        return None
    side: dict[str, str] = {}
    for name in ("train", "test"):
        source = folder / f"{name}_list.mat"
        if source.is_file():
            files, labels = _read_split_list(source)
            _check_list_labels(files, labels, source)
            side.update((f, name) for f in files)
    # "" marks a photo in neither list (one a user added); the caller decides its side.
    return np.array([side.get(p, "") for p in paths], dtype="<U5")


def _largest_box(xml_path: Path) -> Box | None:
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError):
        return None  # a broken annotation only costs its box, never the photo
    best, best_area = None, -1
    for bndbox in tree.iter("bndbox"):
        try:
            box = tuple(int(round(float(bndbox.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            continue
        area = max(0, box[2] - box[0]) * max(0, box[3] - box[1])
        if area > best_area:
            best, best_area = box, area
    return best


def _boxes(annotation_dir: Path, paths: Sequence[str]) -> dict[str, Box] | None:
    if not annotation_dir.is_dir():
        return None
    boxes: dict[str, Box] = {}
    for rel in paths:
        folder, _, name = rel.rpartition("/")
        stem = name.rsplit(".", 1)[0]
        # The official files have no extension; some re-packagings add .xml.
        for candidate in (annotation_dir / folder / stem, annotation_dir / folder / f"{stem}.xml"):
            if candidate.is_file():
                box = _largest_box(candidate)
                if box is not None:
                    boxes[rel] = box
                break
    return boxes


def list_stanford_dogs(root: str | os.PathLike, breeds=None) -> PhotoListing:
    """List Stanford Dogs under root (Images/, maybe Annotation/ and lists/); breeds: None, N or names."""
    root = Path(root)
    images = root / "Images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"{root} has no Images/ folder; expected {root}/Images/n02085620-Chihuahua/*.jpg "
            "(find_stanford_dogs() looks in the usual places)"
        )
    listing = _list_classes(images, breeds, "breed")
    listing.official_split = _official_split(root, listing.paths)
    listing.boxes = _boxes(root / "Annotation", listing.paths)
    return listing


# ---------------------------------------------------------------------------------------------------
# Finding and downloading


def _keras_dataset_dirs() -> list[Path]:
    # Keras falls back to /tmp/.keras when ~/.keras is not writable, so a download may have landed there.
    homes = [os.environ.get("KERAS_HOME"), "~/.keras", os.path.join(tempfile.gettempdir(), ".keras")]
    dirs = [Path(h).expanduser() / "datasets" for h in homes if h]
    return list(dict.fromkeys(dirs))


def _normal_folder_name(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _candidate_roots(data_dir: Path) -> list[Path]:
    candidates = [data_dir]
    if data_dir.name == "Images":
        candidates.append(data_dir.parent)
    if data_dir.is_dir():
        candidates += sorted(
            child
            for child in data_dir.iterdir()
            if child.is_dir() and _normal_folder_name(child.name) in {"stanforddogs", "stanforddogsdataset"}
        )
    return candidates


def find_stanford_dogs(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the Stanford Dogs root (the folder holding Images/) in data_dir or Keras's cache, else raise."""
    if data_dir is not None:
        # An explicit folder is looked at alone: silently training on some other copy would mislead.
        candidates = _candidate_roots(Path(data_dir).expanduser())
    else:
        candidates = [d / "stanford_dogs" for d in _keras_dataset_dirs()]
    for candidate in candidates:
        if (candidate / "Images").is_dir():
            return candidate
    looked = "\n  ".join(str(c) for c in candidates)
    where = Path(data_dir).expanduser() / "stanford_dogs" if data_dir else candidates[0]
    raise FileNotFoundError(
        f"Stanford Dogs not found; looked for an Images/ folder in:\n  {looked}\n"
        f"Put the data set so that {where}/Images/n02085620-Chihuahua/n02085620_5927.jpg exists "
        f"(optionally with {where}/Annotation/ and {where}/lists/), "
        "or pass the folder holding Images/ as the data dir.\n"
        f"Official archives: {STANFORD_DOGS_URL}images.tar (757 MiB), {STANFORD_DOGS_URL}annotation.tar, "
        f"{STANFORD_DOGS_URL}lists.tar; download_stanford_dogs({str(where)!r}) fetches and unpacks them."
    )


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"refusing to extract {member.name!r}: links and special files are not expected")
    target = (dest / member.name).resolve()
    if not target.is_relative_to(dest):
        raise ValueError(f"refusing to extract {member.name!r}: it points outside {dest}")


def _safe_extract(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, dest)
        # The "data" filter (Python >= 3.10.12 / 3.11.4) repeats the path checks and drops set-uid bits.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def _download(url: str, target: Path, size: int | None, sha256: str | None) -> None:
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "dog-breed-search (python urllib)"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        _verify(url, part, size, sha256, digest.hexdigest())
    except BaseException:
        part.unlink(missing_ok=True)  # never leave a half file that looks like progress
        raise
    os.replace(part, target)


def _verify(url: str, path: Path, size: int | None, sha256: str | None, actual_sha256: str) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise OSError(f"{url}: got {got:,} bytes, expected {size:,}")
    if sha256 is not None and actual_sha256 != sha256:
        raise OSError(f"{url}: SHA-256 {actual_sha256} does not match the expected {sha256}")
    if not tarfile.is_tarfile(path):
        raise OSError(f"{url}: the download is not a tar archive")


def download_and_extract(
    url: str, dest: str | os.PathLike, folder: str, size: int | None = None, sha256: str | None = None
) -> Path:
    """Download a tar (verifying size and SHA-256 when known) and unpack it safely as dest/folder."""
    dest = Path(dest)
    target = dest / folder
    if target.is_dir() and any(target.iterdir()):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(urllib.parse.urlparse(url).path).name
    _download(url, archive, size, sha256)
    # Unpack beside the target and move it in at the end, so an interrupted run leaves no half folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=dest))
    try:
        _safe_extract(archive, staging)
        inner = list(staging.iterdir())
        source = inner[0] if len(inner) == 1 and inner[0].name == folder and inner[0].is_dir() else staging
        os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()  # the unpacked folder is the record; keeping 800 MB of tar beside it doubles the disk
    return target


def download_stanford_dogs(dest: str | os.PathLike | None = None, base_url: str = STANFORD_DOGS_URL) -> Path:
    """Fetch and unpack images.tar, annotation.tar and lists.tar into dest (default: Keras's cache)."""
    dest = Path(dest) if dest is not None else _keras_dataset_dirs()[0] / "stanford_dogs"
    for name, (folder, size, sha256) in STANFORD_DOGS_ARCHIVES.items():
        download_and_extract(base_url + name, dest, folder, size, sha256)
    return dest


# ---------------------------------------------------------------------------------------------------
# Decoding


def _clamp_box(box: Box | None, width: int, height: int) -> Box | None:
    if box is None:
        return None
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(width, box[2]), min(height, box[3])
    # A box that misses the picture is an annotation error; the whole photo is still a good example.
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _scaled_box(box: Box, sx: float, sy: float) -> Box:
    return (math.floor(box[0] * sx), math.floor(box[1] * sy), math.ceil(box[2] * sx), math.ceil(box[3] * sy))


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # broken EXIF must not cost the photo
        return 1


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    # Pillow's convert clips 16-bit and float greys at 255, which turns a normal photo white.
    pixels = np.asarray(im, dtype=np.float64)
    peak = pixels.max(initial=0)
    if im.mode == "F" and peak <= 1.0:
        pixels = pixels * 255
    elif peak > 255:
        pixels = pixels / 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent parts show white, as a viewer shows them, not the arbitrary colours stored under them.
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_depth_to_8bit(im)
    try:
        return im.convert("RGB")
    except ValueError as error:
        raise BadPhotoError(f"unsupported colour mode {im.mode}") from error


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in _PHOTO_FORMATS if f in Image.OPEN)


def _decode(data: bytes, size: int, box: Box | None) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=_readable_formats())
    width, height = im.size
    orientation = _orientation(im)
    crop = _clamp_box(box, width, height)
    region_w, region_h = (crop[2] - crop[0], crop[3] - crop[1]) if crop else (width, height)
    # libjpeg decodes at 1/2, 1/4 or 1/8 scale almost for free; take the smallest keeping the region >= size.
    im.draft("RGB", (math.ceil(size * width / region_w), math.ceil(size * height / region_h)))
    im.load()
    if crop:
        im = im.crop(_scaled_box(crop, im.width / width, im.height / height))
    im = _to_rgb(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    # Boxes are in stored pixels (as the annotation tools saw them), so turn upright only after cropping.
    if orientation in _ORIENTATION:
        im = im.transpose(_ORIENTATION[orientation])
    return np.asarray(im)


def _reason(error: Exception) -> str:
    if isinstance(error, BadPhotoError):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return "too large"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    text = str(error)
    # Pillow says "image file is truncated (...)" or "Truncated File Read" (LOAD_TRUNCATED_IMAGES stays off).
    if "truncated" in text.lower():
        return "truncated"
    return f"corrupt ({type(error).__name__}: {text})"


def decode_photo(source: str | os.PathLike | bytes, size: int, box: Box | None = None) -> np.ndarray:
    """Decode one photo (path or bytes) to (size, size, 3) uint8 RGB; raise BadPhotoError with the reason."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise BadPhotoError(f"unreadable ({error.strerror or error})") from error
    if not data:
        raise BadPhotoError("empty file")
    try:
        return _decode(data, size, box)
    except Exception as error:  # any decoder failure is this file's problem, never the batch's
        raise BadPhotoError(_reason(error)) from error


def load_images(
    root: str | os.PathLike,
    paths: Sequence[str],
    size: int,
    boxes: Mapping[str, Box] | None = None,
    workers: int = 2,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode paths under root: (uint8 images (N_good, size, size, 3), kept indices, [(path, reason)] skipped)."""
    root = Path(root)
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(paths)

    def decode_one(i: int) -> None:
        box = boxes.get(paths[i]) if boxes else None
        try:
            images[i] = decode_photo(root / paths[i], size, box)
        except BadPhotoError as error:
            reasons[i] = str(error)

    # Threads suffice: Pillow releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = pool.map(decode_one, range(len(paths)))
        from runners.progress import long_work_bar  # here: the registered model ships this module alone

        with long_work_bar(len(paths), "decoding", "img", enabled=progress) as bar:
            for _ in done:
                bar.update()

    kept = np.array([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    bad = [(paths[i], r) for i, r in enumerate(reasons) if r is not None]
    if bad:
        # Compact in place, then view, so a large batch never needs a second full-size copy.
        for slot, i in enumerate(kept):
            if slot != i:
                images[slot] = images[i]
        images = images[: len(kept)]
    return images, kept, bad


def bad_file_report(bad: Sequence[tuple[str, str]], limit: int = 10, total: int | None = None) -> str:
    """Describe skipped files for people: a count line, up to limit "  path: reason" lines, then the rest."""
    of = f" of {total:,}" if total is not None else ""
    if not bad:
        return f"no bad files{' among ' + format(total, ',') if total is not None else ''}"
    noun = "file" if len(bad) == 1 else "files"
    lines = [f"skipped {len(bad):,} bad {noun}{of}:"]
    lines += [f"  {path}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit:,} more")
    return "\n".join(lines)
