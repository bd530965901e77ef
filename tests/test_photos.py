"""Tests for runners.photos: listing photo folders and Stanford Dogs, decoding odd files, finding and fetching data."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from runners import photos
from runners.photos import (
    BadPhotoError,
    bad_file_report,
    clean_breed_name,
    decode_photo,
    download_and_extract,
    find_stanford_dogs,
    list_photo_folder,
    list_stanford_dogs,
    load_images,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DOGS = SHARED_DATA / "stanford_dogs"
needs_shared_dogs = pytest.mark.skipif(
    not (SHARED_DOGS / "Images").is_dir(), reason=f"shared Stanford Dogs copy not found at {SHARED_DOGS}"
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy_jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "JPEG")


def two_frame_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), BLUE), Image.new("RGB", (20, 20), RED)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def half_transparent_png() -> bytes:
    pixels = np.zeros((20, 20, 4), dtype=np.uint8)  # stored colour under the transparent half is black
    pixels[:, :10] = (*BLUE, 255)
    return encoded(Image.fromarray(pixels, "RGBA"), "PNG")


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A photo library as people really have them: odd formats, broken files and junk."""
    files = {
        "beagle/good.jpg": encoded(Image.new("RGB", (40, 30), RED), "JPEG"),
        "beagle/grey.jpg": encoded(Image.new("L", (40, 30), 128), "JPEG"),
        "beagle/cmyk.jpg": encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "beagle/2019/summer/deep.jpg": encoded(Image.new("RGB", (40, 30), GREEN), "JPEG"),
        "beagle/truncated.jpg": noisy_jpeg()[:3000],
        "beagle/empty.jpg": b"",
        "beagle/notes.txt": b"vet appointment on Tuesday\n",
        "beagle/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "beagle/.thumbnails/hidden.jpg": encoded(Image.new("RGB", (8, 8), RED), "JPEG"),
        "golden_retriever/really_png.jpg": encoded(Image.new("RGB", (30, 30), GREEN), "PNG"),
        "golden_retriever/really_gif.jpg": two_frame_gif(),
        "golden_retriever/cutout.png": half_transparent_png(),
        "golden_retriever/Thumbs.db": bytes(range(256)) * 4,
        "pug/pug.jpg": noisy_jpeg(seed=1),
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "empty_class").mkdir()
    return tmp_path


def test_folder_listing_counts_every_visible_file_at_any_depth(messy_folder):
    listing = list_photo_folder(messy_folder)
    assert listing.class_ids == ["beagle", "golden_retriever", "pug"]
    assert listing.class_names == ["beagle", "golden retriever", "pug"]
    assert listing.paths == [
        "beagle/2019/summer/deep.jpg",
        "beagle/cmyk.jpg",
        "beagle/empty.jpg",
        "beagle/good.jpg",
        "beagle/grey.jpg",
        "beagle/notes.txt",
        "beagle/truncated.jpg",
        "golden_retriever/Thumbs.db",
        "golden_retriever/cutout.png",
        "golden_retriever/really_gif.jpg",
        "golden_retriever/really_png.jpg",
        "pug/pug.jpg",
    ]
    assert listing.labels.tolist() == [0] * 7 + [1] * 4 + [2]
    assert listing.official_split is None and listing.boxes is None


def test_load_images_skips_bad_files_with_their_reasons(messy_folder):
    listing = list_photo_folder(messy_folder)
    images, kept, bad = load_images(listing.root, listing.paths, 16)
    assert dict(bad) == {
        "beagle/empty.jpg": "empty file",
        "beagle/notes.txt": "not an image",
        "beagle/truncated.jpg": "truncated",
        "golden_retriever/Thumbs.db": "not an image",
    }
    assert [listing.paths[i] for i in kept] == [
        "beagle/2019/summer/deep.jpg",
        "beagle/cmyk.jpg",
        "beagle/good.jpg",
        "beagle/grey.jpg",
        "golden_retriever/cutout.png",
        "golden_retriever/really_gif.jpg",
        "golden_retriever/really_png.jpg",
        "pug/pug.jpg",
    ]
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    assert listing.labels[kept].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]


def test_load_images_converts_odd_formats_to_rgb(messy_folder):
    paths = [
        "beagle/cmyk.jpg",
        "beagle/grey.jpg",
        "golden_retriever/really_png.jpg",
        "golden_retriever/really_gif.jpg",
        "golden_retriever/cutout.png",
    ]
    images, kept, bad = load_images(messy_folder, paths, 16, workers=1)
    cmyk, grey, png, gif, cutout = images.astype(int)
    assert bad == [] and kept.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(png, np.broadcast_to(GREEN, (16, 16, 3)))
    np.testing.assert_allclose(cmyk.mean(axis=(0, 1)), RED, atol=8)
    assert np.all(grey == grey[..., :1]) and abs(grey.mean() - 128) < 3
    np.testing.assert_allclose(gif.mean(axis=(0, 1)), BLUE, atol=2)  # first frame only
    np.testing.assert_array_equal(cutout[:, :6], np.broadcast_to(BLUE, (16, 6, 3)))
    np.testing.assert_array_equal(cutout[:, -6:], np.full((16, 6, 3), 255))  # transparent shows white


def test_phone_photos_are_turned_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = RED  # stored sideways: the top of the scene is on the left
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    images, _, _ = load_images(tmp_path, ["phone.jpg"], 16)
    upright = images[0].astype(int)
    assert upright[:6, :, 0].min() > 200 and upright[-6:, :, 2].min() > 200  # red on top, blue below


def test_16_bit_greyscale_keeps_its_brightness(tmp_path):
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(tmp_path / "scan.png")
    images, _, _ = load_images(tmp_path, ["scan.png"], 8)
    assert np.all(np.abs(images.astype(int) - 128) <= 1)  # not clipped to white


def test_decode_photo_takes_uploaded_bytes():
    photo = decode_photo(encoded(Image.new("RGB", (50, 40), GREEN), "PNG"), 24)
    assert photo.shape == (24, 24, 3) and photo.dtype == np.uint8
    with pytest.raises(BadPhotoError, match="^not an image$"):
        decode_photo(b"<html>404 Not Found</html>", 24)


def test_bad_file_report_names_the_skipped_files(messy_folder):
    listing = list_photo_folder(messy_folder)
    _, _, bad = load_images(listing.root, listing.paths, 16)
    report = bad_file_report(bad, total=len(listing.paths))
    assert report.splitlines() == [
        "skipped 4 bad files of 12:",
        "  beagle/empty.jpg: empty file",
        "  beagle/notes.txt: not an image",
        "  beagle/truncated.jpg: truncated",
        "  golden_retriever/Thumbs.db: not an image",
    ]


def test_bad_file_report_stops_after_the_limit():
    bad = [(f"cls/{i:04d}.jpg", "truncated") for i in range(1234)]
    lines = bad_file_report(bad, total=20580).splitlines()
    assert lines[0] == "skipped 1,234 bad files of 20,580:"
    assert len(lines) == 12 and lines[-1] == "  ... and 1,224 more"


@pytest.mark.parametrize(
    "folder, name",
    [
        ("n02085620-Chihuahua", "Chihuahua"),
        ("n02085782-Japanese_spaniel", "Japanese spaniel"),
        ("n02089078-black-and-tan_coonhound", "black-and-tan coonhound"),
        ("golden_retriever", "golden retriever"),
        ("001.Affenpinscher", "Affenpinscher"),
    ],
)
def test_clean_breed_name(folder, name):
    assert clean_breed_name(folder) == name


def test_folder_classes_can_be_chosen_by_name(messy_folder):
    listing = list_photo_folder(messy_folder, classes=["Pug", "golden retriever"])
    assert listing.class_ids == ["golden_retriever", "pug"]
    assert listing.labels.tolist() == [0, 0, 0, 0, 1]


@needs_shared_dogs
def test_shared_stanford_dogs_has_120_breeds_of_100_photos():
    dogs = list_stanford_dogs(SHARED_DOGS)
    assert len(dogs.class_ids) == 120 and len(dogs.paths) == 12_000
    assert np.bincount(dogs.labels).tolist() == [100] * 120
    assert dogs.class_ids[:2] == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    assert dogs.class_names[:2] == ["Chihuahua", "Japanese spaniel"]
    assert dogs.paths[0] == "n02085620-Chihuahua/n02085620_10131.jpg"
    assert (dogs.root / dogs.paths[0]).is_file()
    assert dogs.official_split is None and dogs.boxes is None  # the shared copy has no lists/ or Annotation/


@needs_shared_dogs
def test_breeds_chosen_by_count_are_the_first_in_wnid_order():
    dogs = list_stanford_dogs(SHARED_DOGS, breeds=3)
    assert dogs.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    assert len(dogs.paths) == 300 and dogs.labels.max() == 2


@needs_shared_dogs
def test_breeds_chosen_by_clean_name_folder_or_wnid():
    dogs = list_stanford_dogs(SHARED_DOGS, breeds=["maltese dog", "n02085620", "n02085782-Japanese_spaniel"])
    assert dogs.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]


@needs_shared_dogs
def test_unknown_breed_names_the_close_matches():
    with pytest.raises(ValueError, match=r"unknown breed 'poodel'; did you mean: .*toy poodle"):
        list_stanford_dogs(SHARED_DOGS, breeds=["Chihuahua", "poodel"])


@needs_shared_dogs
def test_find_stanford_dogs_looks_inside_a_data_folder():
    assert find_stanford_dogs(SHARED_DATA) == SHARED_DOGS


@pytest.fixture
def official_layout(tmp_path: Path) -> Path:
    """A tiny Stanford Dogs tree with Annotation/ and lists/ in the official forms."""
    half_red_half_blue = np.zeros((80, 100, 3), dtype=np.uint8)
    half_red_half_blue[:, :50] = RED
    half_red_half_blue[:, 50:] = BLUE
    photos = {
        "n02085620-Chihuahua/n02085620_1.jpg": Image.new("RGB", (100, 80), GREEN),
        "n02085620-Chihuahua/n02085620_2.jpg": Image.fromarray(half_red_half_blue),
        "n02085782-Japanese_spaniel/n02085782_1.jpg": Image.new("RGB", (100, 80), RED),
    }
    for rel, image in photos.items():
        (tmp_path / "Images" / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "Images" / rel, quality=95)
    write_annotation(tmp_path / "Annotation/n02085620-Chihuahua/n02085620_1", [(10, 5, 60, 70)])
    write_annotation(tmp_path / "Annotation/n02085620-Chihuahua/n02085620_2", [(0, 0, 20, 20), (52, 0, 130, 80)])
    write_split_list(tmp_path / "lists/train_list.mat", {"n02085620-Chihuahua/n02085620_2.jpg": 1})
    write_split_list(
        tmp_path / "lists/test_list.mat",
        {"n02085620-Chihuahua/n02085620_1.jpg": 1, "n02085782-Japanese_spaniel/n02085782_1.jpg": 2},
    )
    return tmp_path


def write_annotation(path: Path, boxes: list[tuple[int, int, int, int]]) -> None:
    objects = "".join(
        f"<object><name>dog</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>100</width><height>80</height></size>{objects}</annotation>")


def write_split_list(path: Path, labels_by_file: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    file_list = np.empty((len(labels_by_file), 1), dtype=object)  # a MATLAB cell column of strings
    file_list[:, 0] = list(labels_by_file)
    labels = np.array(list(labels_by_file.values()), dtype=np.float64).reshape(-1, 1)
    scipy.io.savemat(path, {"file_list": file_list, "annotation_list": file_list, "labels": labels})


def test_official_lists_give_each_photo_its_side(official_layout):
    dogs = list_stanford_dogs(official_layout)
    assert dogs.paths == [
        "n02085620-Chihuahua/n02085620_1.jpg",
        "n02085620-Chihuahua/n02085620_2.jpg",
        "n02085782-Japanese_spaniel/n02085782_1.jpg",
    ]
    assert dogs.official_split.tolist() == ["test", "train", "test"]


def test_annotation_gives_the_largest_box(official_layout):
    dogs = list_stanford_dogs(official_layout)
    assert dogs.boxes == {
        "n02085620-Chihuahua/n02085620_1.jpg": (10, 5, 60, 70),
        "n02085620-Chihuahua/n02085620_2.jpg": (52, 0, 130, 80),
    }


def test_load_images_crops_to_the_box_clamped_to_the_photo(official_layout):
    dogs = list_stanford_dogs(official_layout, breeds=["Chihuahua"])
    images, _, _ = load_images(dogs.root, dogs.paths, 16, boxes=dogs.boxes)
    blue_half = images[1].astype(int)
    assert blue_half[..., 2].min() > 200 and blue_half[..., 0].max() < 60


def test_find_stanford_dogs_uses_the_keras_cache(tmp_path, monkeypatch):
    (tmp_path / "datasets/stanford_dogs/Images/n02085620-Chihuahua").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert find_stanford_dogs() == tmp_path / "datasets/stanford_dogs"


def test_missing_stanford_dogs_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        find_stanford_dogs(tmp_path / "nowhere")
    message = str(error.value)
    assert f"{tmp_path}/nowhere/stanford_dogs/Images/n02085620-Chihuahua" in message
    assert "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar" in message


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_verifies_and_unpacks_an_archive(tmp_path):
    archive = make_tar(tmp_path / "images.tar", {"Images/n02085620-Chihuahua/a.jpg": b"jpeg bytes"})
    data = archive.read_bytes()
    folder = download_and_extract(
        archive.as_uri(), tmp_path / "dogs", "Images", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    assert folder == tmp_path / "dogs/Images"
    assert (folder / "n02085620-Chihuahua/a.jpg").read_bytes() == b"jpeg bytes"
    assert sorted(p.name for p in (tmp_path / "dogs").iterdir()) == ["Images"]  # no tar, .part or staging left


def test_download_puts_a_flat_archive_in_its_folder(tmp_path):
    archive = make_tar(tmp_path / "lists.tar", {"train_list.mat": b"m", "test_list.mat": b"m"})
    folder = download_and_extract(archive.as_uri(), tmp_path / "dogs", "lists")
    assert sorted(p.name for p in folder.iterdir()) == ["test_list.mat", "train_list.mat"]


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path):
    archive = make_tar(tmp_path / "images.tar", {"Images/a.jpg": b"x"})
    with pytest.raises(OSError, match="SHA-256"):
        download_and_extract(archive.as_uri(), tmp_path / "dogs", "Images", sha256="0" * 64)
    assert list((tmp_path / "dogs").iterdir()) == []


def test_download_refuses_paths_outside_the_destination(tmp_path):
    archive = make_tar(tmp_path / "evil.tar", {"Images/a.jpg": b"x", "../../escaped.txt": b"gotcha"})
    with pytest.raises(ValueError, match="outside"):
        download_and_extract(archive.as_uri(), tmp_path / "a/dogs", "Images")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a/escaped.txt").exists()


def test_download_stanford_dogs_unpacks_the_three_archives_into_a_listable_tree(official_layout, tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    with tarfile.open(server / "images.tar", "w") as tar:
        tar.add(official_layout / "Images", "Images")
    with tarfile.open(server / "annotation.tar", "w") as tar:
        tar.add(official_layout / "Annotation", "Annotation")
    with tarfile.open(server / "lists.tar", "w") as tar:  # the real lists.tar has no lists/ folder
        for mat in (official_layout / "lists").iterdir():
            tar.add(mat, mat.name)
    table = {
        name: (folder, (server / name).stat().st_size, hashlib.sha256((server / name).read_bytes()).hexdigest())
        for name, (folder, _, _) in photos.STANFORD_DOGS_ARCHIVES.items()
    }
    monkeypatch.setattr(photos, "STANFORD_DOGS_ARCHIVES", table)
    root = photos.download_stanford_dogs(tmp_path / "cache/stanford_dogs", base_url=server.as_uri() + "/")
    dogs = list_stanford_dogs(find_stanford_dogs(tmp_path / "cache"))
    assert root == tmp_path / "cache/stanford_dogs"
    assert len(dogs.paths) == 3 and dogs.official_split.tolist() == ["test", "train", "test"]
    assert len(dogs.boxes) == 2
