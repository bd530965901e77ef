"""Stanford Dogs and the shelter's own photo folders: short real studies, splits that agree, bad files."""
import io

import optuna
from mlflow import MlflowClient
from PIL import Image

from conftest import write_space, TINY_SPACE
from runners.datasets import load_dataset
from search.config import SearchConfig
from search.drivers import run_search

DOG_SPACE = TINY_SPACE.replace("dataset: cifar10", "dataset: stanford_dogs").replace("image_size: 32", "image_size: 48") \
    .replace("subset: 300", "subset: null")


def test_a_short_study_on_three_breeds_trains_and_logs_clean_breed_names(dogs_dir, workdir, tmp_path):
    space = write_space(tmp_path, DOG_SPACE)
    summary = run_search(SearchConfig(space=str(space), data_dir=str(dogs_dir), breeds="3", trials=2))
    assert summary.study_name == "tiny-stanford_dogs" and summary.counted == 2
    study = optuna.load_study(study_name="tiny-stanford_dogs", storage=f"sqlite:///{workdir}/optuna.db")
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.data.params["dataset"] == "stanford_dogs" and run.data.params["image_size"] == "48"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"stanford_dogs"}


def test_breeds_by_name_and_the_test_split_agree_across_selections(dogs_dir, workdir):
    three = load_dataset("stanford_dogs", data_dir=dogs_dir, image_size=32, breeds=3, workdir=workdir)
    named = load_dataset("stanford_dogs", data_dir=dogs_dir, image_size=32,
                         breeds=["Chihuahua", "Japanese spaniel"], workdir=workdir)
    assert named.class_names == ["Chihuahua", "Japanese spaniel"]
    assert set(named.keys["test"]) <= set(three.keys["test"])  # a breed's test photos are the same in both
    assert not set(three.keys["test"]) & set(three.keys["train"] + three.keys["val"])
    sizes = three.sizes()
    assert 0.12 < sizes["test"] / sum(sizes.values()) < 0.28  # 20% by hash, stratified in expectation


def test_the_decoded_images_are_cached_and_reused(dogs_dir, workdir):
    load_dataset("stanford_dogs", data_dir=dogs_dir, image_size=40, breeds=2, workdir=workdir)
    cached = list((workdir / "cache" / "images").glob("*/images.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = load_dataset("stanford_dogs", data_dir=dogs_dir, image_size=40, breeds=2, workdir=workdir)
    assert cached[0].stat().st_mtime_ns == stamp and again.splits["train"][0].shape[1:] == (40, 40, 3)


def messy_library(root, dogs_dir):
    """Two breeds of real photos plus every kind of bad file a shelter's folder holds."""
    for breed, source in (("beagle", "n02088364-beagle"), ("pug", "n02110958-pug")):
        folder = root / breed
        folder.mkdir(parents=True)
        for i, photo in enumerate(sorted((dogs_dir / "Images" / source).glob("*.jpg"))[:30]):
            (folder / f"{i}.jpg").write_bytes(photo.read_bytes())
    real = (root / "beagle" / "0.jpg").read_bytes()
    (root / "beagle" / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (root / "beagle" / "empty.jpg").write_bytes(b"")
    (root / "beagle" / "notes.txt").write_text("adopted 2024")
    png = io.BytesIO()
    Image.open(io.BytesIO(real)).convert("RGBA").save(png, "PNG")
    (root / "pug" / "really_a_png.jpg").write_bytes(png.getvalue())
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(real)).convert("CMYK").save(cmyk, "JPEG")
    (root / "pug" / "cmyk.jpg").write_bytes(cmyk.getvalue())
    Image.open(io.BytesIO(real)).convert("L").save(root / "pug" / "grey.jpg")


def test_a_messy_photo_folder_trains_and_reports_its_bad_files(dogs_dir, workdir, tmp_path, capsys):
    library = tmp_path / "shelter"
    messy_library(library, dogs_dir)
    space = write_space(tmp_path, DOG_SPACE)
    summary = run_search(SearchConfig(space=str(space), dataset=f"folder:{library}", trials=1))
    assert summary.study_name == "tiny-folder" and summary.counted == 1
    data = load_dataset(f"folder:{library}", image_size=48, workdir=workdir)
    assert sum(data.sizes().values()) == 63  # 60 photos + PNG-as-jpg + CMYK + greyscale, converted
    assert {path.split("/")[-1] for path, _ in data.bad_files} == {"truncated.jpg", "empty.jpg", "notes.txt"}


def test_warm_start_enqueues_the_best_cifar_configurations_without_image_or_batch_size(
        cifar_dir, dogs_dir, workdir, tmp_path):
    cifar_space = write_space(tmp_path, TINY_SPACE)
    run_search(SearchConfig(space=str(cifar_space), data_dir=str(cifar_dir), trials=2))
    dogs_space = tmp_path / "dogs.yaml"
    dogs_space.write_text(DOG_SPACE.replace("batch_size: {type: categorical, choices: [32, 64], default: 64}",
                                            "batch_size: {type: categorical, choices: [16, 32], default: 16}"))
    run_search(SearchConfig(space=str(dogs_space), data_dir=str(dogs_dir), breeds="2", trials=2,
                            warm_start="tiny-cifar10:1", default_trial=False))
    cifar = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    dogs = optuna.load_study(study_name="tiny-stanford_dogs", storage=f"sqlite:///{workdir}/optuna.db")
    first = dogs.trials[0]
    assert first.user_attrs["source"] == f"warm-start:tiny-cifar10#{cifar.best_trial.number}"
    assert first.params["learning_rate"] == cifar.best_trial.params["learning_rate"]
    assert first.params["batch_size"] in (16, 32)
