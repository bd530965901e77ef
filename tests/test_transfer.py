"""Transfer learning on real dog photos: weights from Keras's cache, the feature cache, short real studies."""
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from runners import transfer
from runners.datasets import load_dataset
from runners.transfer import BACKBONES, Weights, resolve_weights
from search import space as spaces
from search.config import SearchConfig
from search.errors import ConfigError
from search.drivers import run_search
from search.setup import prepare_run as prepare


def write_keras_cache_file(backbone_name: str, image_size: int) -> tuple[Path, keras.Model]:
    """Random weights of a keras.applications backbone, saved where and as keras.applications keeps them."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    backbone = BACKBONES[backbone_name]
    model = getattr(keras.applications, backbone.application)(include_top=False, weights=None,
                                                              input_shape=(image_size, image_size, 3))
    path = transfer.keras_models_dir() / transfer.weights_file_name(backbone, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:  # the legacy .h5 layout of the files Keras downloads
        save_weights_to_hdf5_group(f, model)
    return path, model


def small_dogs(dogs_dir, workdir, image_size=96, breeds=3, subset=30):
    """A few breeds of the shared dogs at a small size: a fast, real dataset."""
    return load_dataset("stanford_dogs", data_dir=str(dogs_dir), image_size=image_size, subset=subset,
                        breeds=breeds, workdir=workdir)


def default_params(**changes) -> dict:
    """The transfer space's default trial on EfficientNet-Lite0 (the fastest to embed), with changes."""
    params = spaces.default_params(spaces.load_space("transfer"))
    params.update({"backbone": "efficientnet_lite0", **changes})
    return params


# ---------------------------------------------------------------- weights


def test_weights_under_the_keras_cache_name_are_the_weights_loaded(workdir):
    path, written = write_keras_cache_file("mobilenet_v2", 96)
    assert path.name == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    weights = resolve_weights(BACKBONES["mobilenet_v2"], 96, None)
    assert weights.path == path and len(weights.sha256) == 64
    loaded = transfer.build_backbone(BACKBONES["mobilenet_v2"], 96, weights)
    for mine, theirs in zip(loaded.get_weights(), written.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


def test_a_weights_path_is_used_and_none_means_random_initialisation(workdir, tmp_path):
    path, written = write_keras_cache_file("mobilenet_v2", 96)
    moved = path.rename(tmp_path / "my_mobilenet.h5")
    weights = resolve_weights(BACKBONES["mobilenet_v2"], 96, str(moved))
    loaded = transfer.build_backbone(BACKBONES["mobilenet_v2"], 96, weights)
    np.testing.assert_array_equal(loaded.get_weights()[0], written.get_weights()[0])
    assert resolve_weights(BACKBONES["mobilenet_v2"], 96, "none") == Weights(None, "random")
    assert weights.tags()["search.weights_file"] == "my_mobilenet.h5"


def test_missing_weights_offline_stop_the_run_naming_the_file_and_folder(dogs_dir, workdir):
    config = SearchConfig(space="transfer", backbone="mobilenet_v2", data_dir=str(dogs_dir), breeds="3",
                          subset=30, image_size=96, trials=1, workdir=str(workdir))
    with pytest.raises(ConfigError) as err:
        run_search(config)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in str(err.value)
    assert str(transfer.keras_models_dir()) in str(err.value)
    assert not (workdir / "optuna.db").exists()  # stopped before any trial


def test_without_backbone_flag_only_backbones_whose_weights_are_here_are_searched(dogs_dir, workdir):
    config = SearchConfig(space="transfer", data_dir=str(dogs_dir), breeds="3", subset=30, image_size=96,
                          workdir=str(workdir))
    write_keras_cache_file("mobilenet_v2", 96)
    choices = prepare(config).space.params["backbone"].choices
    assert "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2" in choices and "mobilenet_v2" in choices
    assert "resnet50" not in choices  # its weights are not in Keras's cache here
    config.backbone = "efficientnet_lite1+efficientnet_lite0,efficientnet_lite2"  # a combination is named in order
    with pytest.raises(ConfigError, match="efficientnet_lite1\\+efficientnet_lite0: not in the space's backbones"):
        prepare(config)
    config.backbone = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2,efficientnet_lite2"
    assert prepare(config).space.params["backbone"].choices == (
        "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2", "efficientnet_lite2")


def test_backbone_flag_narrows_the_choice_and_rejects_unknown_names(dogs_dir, workdir):
    config = SearchConfig(space="transfer", backbone="MobileNetV2,efficientnet_lite0", weights="none",
                          data_dir=str(dogs_dir), breeds="3", subset=30, image_size=96, workdir=str(workdir))
    assert prepare(config).space.params["backbone"].choices == ("mobilenet_v2", "efficientnet_lite0")
    config.backbone = "vgg16"
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'; available: efficientnet_lite0, mobilenet_v2"):
        prepare(config)


def test_a_weights_file_named_as_keras_names_it_chooses_its_backbone(dogs_dir, workdir):
    path, _ = write_keras_cache_file("mobilenet_v2", 96)
    config = SearchConfig(space="transfer", weights=str(path), data_dir=str(dogs_dir), breeds="3", subset=30,
                          image_size=96, workdir=str(workdir))
    assert prepare(config).space.params["backbone"].choices == ("mobilenet_v2",)


# ---------------------------------------------------------------- the feature cache


@pytest.mark.slow
def test_the_feature_cache_is_reused_and_changes_with_backbone_weights_and_size(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir)
    lite0 = BACKBONES["efficientnet_lite0"]
    imagenet = resolve_weights(lite0, 96, None)
    first, _ = transfer.feature_set(data, lite0, imagenet, workdir)
    again, _ = transfer.feature_set(data, lite0, imagenet, workdir)
    assert first.built and not again.built and again.key == first.key
    np.testing.assert_array_equal(again.split("val", "average")[0], first.split("val", "average")[0])

    random_file = workdir / "random_lite0.weights.h5"
    transfer.build_backbone(lite0, 96, Weights(None, "random")).save_weights(random_file)
    other_weights, _ = transfer.feature_set(data, lite0, resolve_weights(lite0, 96, str(random_file)), workdir)
    write_keras_cache_file("mobilenet_v2", 96)
    mobilenet = BACKBONES["mobilenet_v2"]
    other_backbone, _ = transfer.feature_set(data, mobilenet, resolve_weights(mobilenet, 96, None), workdir)
    other_size, _ = transfer.feature_set(small_dogs(dogs_dir, workdir, image_size=64), lite0, imagenet, workdir)
    keys = {first.key, other_weights.key, other_backbone.key, other_size.key}
    assert len(keys) == 4 and other_weights.built and other_backbone.built and other_size.built


def test_a_damaged_feature_file_is_detected_and_rebuilt(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir)
    lite0 = BACKBONES["efficientnet_lite0"]
    weights = resolve_weights(lite0, 96, None)
    first, _ = transfer.feature_set(data, lite0, weights, workdir)
    damaged = first.folder / "train_average_original.npy"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    rebuilt, _ = transfer.feature_set(data, lite0, weights, workdir)
    assert rebuilt.built
    np.testing.assert_allclose(rebuilt.split("train", "average")[0], first.split("train", "average")[0], atol=1e-4)
    (rebuilt.folder / "manifest.json").unlink()  # an interrupted build: arrays without a manifest
    assert transfer.feature_set(data, lite0, weights, workdir)[0].built


def test_the_cache_holds_each_photos_mirror_image_features_too(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    lite0 = BACKBONES["efficientnet_lite0"]
    cache, backbone_model = transfer.feature_set(data, lite0, resolve_weights(lite0, 64, None), workdir)
    images = data.splits["val"][0]
    embed = transfer.embedder(backbone_model, lite0, 64)
    np.testing.assert_allclose(cache.split("val", "average", "mirror")[0], embed(images[:, :, ::-1])[0], atol=1e-4)
    assert not np.allclose(cache.split("val", "average", "mirror")[0], cache.split("val", "average")[0], atol=1e-3)


def test_on_a_cpu_the_cache_embeds_through_litert_with_the_features_tensorflow_computes(dogs_dir, workdir):
    from runners.cpu_forward import CONVERSIONS, conversion_pays

    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    lite0 = BACKBONES["efficientnet_lite0"]
    backbone_model = transfer.frozen_backbone(lite0, 64, resolve_weights(lite0, 64, None))
    images = data.splits["val"][0]
    assert len(images) % 8  # a last batch padded to the converted shape
    transfer.embedder(backbone_model, lite0, 64, batch_size=8)(images)  # a few photos: TensorFlow, no conversion
    assert ((backbone_model, 64), 8) not in CONVERSIONS
    assert not conversion_pays(len(images), 64) and conversion_pays(12_000, 288) and conversion_pays(30_000, 64)
    through_litert = transfer.embedder(backbone_model, lite0, 64, batch_size=8, litert=True)(images)
    assert CONVERSIONS[((backbone_model, 64), 8)] is not None  # LiteRT is installed and this is a CPU
    through_tensorflow = transfer.embedder(backbone_model, lite0, 64, batch_size=8, litert=False)(images)
    for litert, tensorflow in zip(through_litert, through_tensorflow):  # average- then max-pooled, in that order
        assert litert.shape == tensorflow.shape == (len(images), 1280)
        np.testing.assert_allclose(litert, tensorflow, atol=1e-4, rtol=1e-4)
    assert not np.allclose(through_litert[0], through_litert[1], atol=1e-2)


# ---------------------------------------------------------------- several backbones, mirror images


def test_several_backbones_train_one_head_on_their_cached_features_and_the_saved_model_takes_images(dogs_dir,
                                                                                                   workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64)
    params = default_params(backbone="efficientnet_lite0+efficientnet_lite1", augmentation="mirror", batch_size=16)
    result = transfer.train_and_evaluate(params, data, epochs=2, patience=2, seed=0, recipes={},
                                         options={"workdir": str(workdir)})
    assert result.tags["search.feature_cache"] == "built,built"  # one cache per backbone
    assert len(result.tags["search.weights_sha256"].split(",")) == 2
    head = result.model.get_layer("head")
    assert head.input_shape[-1] == 1280 + 1280  # Lite0's and Lite1's pooled features side by side
    path = workdir / "combined.keras"
    result.model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    images = data.splits["test"][0].astype("float32")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), result.test_probabilities, atol=1e-4)
    again = transfer.train_and_evaluate(default_params(backbone="efficientnet_lite1", batch_size=16), data,
                                        epochs=1, patience=1, seed=0, recipes={}, options={"workdir": str(workdir)})
    assert again.tags["search.feature_cache"] == "reused"  # Lite1 alone reads the combination's Lite1 cache


def test_head_trials_share_one_frozen_backbone_and_each_saved_model_still_answers_as_its_head(dogs_dir, workdir):
    from runners import feature_heads

    data = small_dogs(dogs_dir, workdir, image_size=64)
    options = {"workdir": str(workdir)}
    images = data.splits["test"][0].astype("float32")
    models = []
    for dropout in (0.0, 0.3):  # two trials in one process, as a study runs them
        params = default_params(dropout=dropout, batch_size=16)
        result = transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes={}, options=options)
        path = workdir / f"trial-{dropout}.keras"
        result.model.save(path)
        models.append((result, path))
    first, second = (result.model.get_layer("efficientnet_lite0") for result, _ in models)
    assert first is second  # built once, not once per trial
    backbone = transfer.backbone_named("efficientnet_lite0")
    weights = resolve_weights(backbone, 64, None)
    shared = feature_heads.frozen_backbone(backbone, 64, weights)
    assert shared is first and not shared._inbound_nodes  # the trials' models are no longer held by it
    for result, path in models:  # each saved model answers as its head on the cached features did
        loaded = keras.models.load_model(path, compile=False)
        np.testing.assert_allclose(loaded.predict(images, verbose=0), result.test_probabilities, atol=1e-4)
    kernel, _ = transfer.imagenet_classifier(backbone, weights)
    assert kernel is transfer.imagenet_classifier(backbone, resolve_weights(backbone, 64, None))[0]  # read once
    assert not kernel.flags.writeable  # shared by every trial: nobody may change it


def test_a_head_on_several_backbones_starts_as_the_mean_of_their_imagenet_classifiers(dogs_dir, workdir):
    from runners import feature_heads

    data = small_dogs(dogs_dir, workdir, image_size=64)
    backbones = transfer.members("efficientnet_lite0+efficientnet_lite1")
    weights = [resolve_weights(b, 64, None) for b in backbones]
    caches = [feature_heads.feature_set(data, b, w, workdir)[0] for b, w in zip(backbones, weights)]
    head = feature_heads.build_head(default_params(dropout=0.0), 2560, 3)
    blocks = [np.asarray(c.split("train", "average")[0]) for c in caches]
    classifiers = [transfer.imagenet_classifier(b, w) for b, w in zip(backbones, weights)]
    matched = feature_heads.init_from_imagenet(head, classifiers, blocks, caches[0].labels["train"])
    x = feature_heads.stacked(caches, "val", "average")
    logits = [block @ k[:, m] + b[m] for block, (k, b), m in
              zip([np.asarray(c.split("val", "average")[0]) for c in caches], classifiers, matched)]
    expected = keras.ops.convert_to_numpy(keras.ops.softmax((logits[0] + logits[1]) / 2))
    np.testing.assert_allclose(head.predict(x, verbose=0), expected, atol=1e-4)


def test_mirror_tta_is_part_of_the_saved_model_and_matches_the_cached_mirror_images(dogs_dir, workdir):
    from runners import feature_heads

    data = small_dogs(dogs_dir, workdir, image_size=64)
    params = default_params(batch_size=16)
    result = transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes={},
                                         options={"workdir": str(workdir)})
    plain, tta = (float(result.tags[f"search.val_accuracy_{k}"]) for k in ("plain", "mirror_tta"))
    adopted = result.tags["search.mirror_tta"] == "adopted"
    assert adopted == (tta > plain) and result.val_accuracy == pytest.approx(tta if adopted else plain, abs=1e-4)
    backbone = BACKBONES[params["backbone"]]
    cache, backbone_model = feature_heads.feature_set(data, backbone, resolve_weights(backbone, 64, None), workdir)
    head = result.model.get_layer("head")
    with_mirror = feature_heads.build_model([backbone_model], [backbone], head, params, 64, mirror_tta=True)
    path = workdir / "tta.keras"
    with_mirror.save(path)
    answers = keras.models.load_model(path, compile=False).predict(data.splits["test"][0].astype("float32"), verbose=0)
    np.testing.assert_allclose(answers, feature_heads.predict(head, [cache], "test", "average", True), atol=1e-4)
    assert not np.allclose(answers, feature_heads.predict(head, [cache], "test", "average", False), atol=1e-4)


def test_a_combination_that_would_train_through_its_backbones_is_refused(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    params = default_params(backbone="efficientnet_lite0+efficientnet_lite1", augmentation="flip")
    with pytest.raises(transfer.ArchitectureError, match="cached features only"):
        transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes={},
                                    options={"workdir": str(workdir)})


def test_under_a_time_budget_an_epoch_through_the_backbone_that_cannot_end_in_time_is_refused(dogs_dir, workdir):
    import time

    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    lite0 = BACKBONES["efficientnet_lite0"]
    transfer.feature_set(data, lite0, resolve_weights(lite0, 64, None), workdir)  # its embedding rate is known
    params = default_params(mode="fine_tune", augmentation="flip", head_init="random", batch_size=16,
                            unfreeze_layers=10, fine_tune_epochs=1, fine_tune_lr_factor=0.1)
    recipes = spaces.load_space("transfer").recipes
    with pytest.raises(transfer.ArchitectureError, match="more than half of the 0 s the time budget has left"):
        transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes=recipes,
                                    options={"workdir": str(workdir), "budget_end": time.time() - 1})
    result = transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes=recipes,
                                         options={"workdir": str(workdir), "budget_end": time.time() + 3600})
    assert result.epochs_run == 2
    uncached = {**params, "backbone": "efficientnet_lite1", "mode": "frozen"}  # its rate is measured on the spot
    with pytest.raises(transfer.ArchitectureError, match="through efficientnet_lite1 take"):
        transfer.train_and_evaluate(uncached, data, epochs=1, patience=1, seed=0, recipes=recipes,
                                    options={"workdir": str(workdir), "budget_end": time.time() - 1})


# ---------------------------------------------------------------- trials and studies


def test_fine_tuning_trains_the_head_then_the_last_layers_through_the_backbone(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64, subset=24)
    params = default_params(mode="fine_tune", unfreeze_layers=10, fine_tune_epochs=1, fine_tune_lr_factor=0.1,
                            augmentation="flip", batch_size=32, head_init="random")
    recipes = spaces.load_space("transfer").recipes
    result = transfer.train_and_evaluate(params, data, epochs=1, patience=2, seed=0, recipes=recipes,
                                         options={"workdir": str(workdir)})
    assert result.epochs_run == 2 and 0.0 <= result.test["test_accuracy"] <= 1.0
    assert result.tags["search.feature_cache"].startswith("not used")
    assert not (workdir / "cache" / "features").exists()


def test_a_head_started_from_imagenets_classifier_knows_the_breeds_before_training(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=160, breeds=4, subset=None)  # 100 photos per breed
    untrained = {"learning_rate": 1e-9, "dropout": 0.0}  # one epoch that changes nothing: the start itself is scored
    scores = {}
    for start in ("random", "imagenet"):
        result = transfer.train_and_evaluate(default_params(head_init=start, **untrained), data, epochs=1,
                                             patience=1, seed=0, recipes={}, options={"workdir": str(workdir)})
        scores[start] = result.test["test_accuracy"]
    assert scores["imagenet"] >= 0.8 and scores["imagenet"] >= scores["random"] + 0.3, scores
    matched = [int(c) for c in result.tags["search.head_init_imagenet_classes"].split(",")]
    assert all(151 <= c <= 275 for c in matched)  # every breed matched to one of ImageNet's dog classes


def test_l2_sp_holds_a_head_started_from_imagenet_near_its_start(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=96, breeds=3, subset=30)

    def trained_head(**changes) -> np.ndarray:
        params = default_params(head_init="imagenet", dropout=0.0, optimizer="adam", lr_schedule="constant",
                                batch_size=8, **changes)
        result = transfer.train_and_evaluate(params, data, epochs=10, patience=10, seed=0, recipes={},
                                             options={"workdir": str(workdir)})
        return result.model.get_layer("head").get_layer("probabilities").get_weights()[0]

    start = trained_head(learning_rate=1e-9)  # where ImageNet's classifier puts it
    free = np.linalg.norm(trained_head(learning_rate=1e-2, l2_sp=0.0) - start)
    held = np.linalg.norm(trained_head(learning_rate=1e-2, l2_sp=1.0) - start)
    assert held < free / 2, (held, free)


def test_imagenet_head_init_is_refused_where_no_imagenet_classifier_exists(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    with pytest.raises(transfer.ArchitectureError, match="dense_layers 0 and pooling average"):
        transfer.train_and_evaluate(default_params(head_init="imagenet", pooling="max"), data, epochs=1, patience=1,
                                    seed=0, recipes={}, options={"workdir": str(workdir)})
    with pytest.raises(transfer.ArchitectureError, match="no ImageNet classifier"):
        transfer.imagenet_classifier(BACKBONES["mobilenet_v2"], Weights(Path("mobilenet.h5"), "x"))


def head_only_space(folder: Path) -> Path:
    """The shipped transfer space with the backbone frozen and no augmentation: every trial can use the cache."""
    text = (Path(spaces.find_space_file("transfer"))).read_text()
    text = text.replace("mode: {type: categorical, choices: [frozen, fine_tune], default: frozen}", "mode: frozen")
    text = text.replace("augmentation: {type: categorical, choices: [mirror, none, flip, flip_crop], default: mirror}",
                        "augmentation: none")
    path = folder / "head_only.yaml"
    path.write_text("\n".join(line for line in text.splitlines() if "when: {mode: [fine_tune]}" not in line))
    return path


@pytest.mark.slow
def test_a_transfer_study_embeds_once_and_a_second_study_reuses_the_cache(dogs_dir, workdir, tmp_path):
    def study(trials):
        return run_search(SearchConfig(space=str(head_only_space(tmp_path)), backbone="efficientnet_lite0",
                                       dataset="stanford_dogs", data_dir=str(dogs_dir), breeds="5", image_size=128,
                                       trials=trials, epochs=2, sampler="random", workdir=str(workdir)))

    study(2)
    manifests = list((workdir / "cache" / "features").glob("*/manifest.json"))
    built_at = manifests[0].stat().st_mtime_ns
    summary = study(3)
    assert len(manifests) == 1 and manifests[0].stat().st_mtime_ns == built_at
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name(summary.study_name)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("search.role") == "trial"]
    cached = sorted(r.data.tags["search.feature_cache"] for r in runs if r.data.tags.get("search.state") == "COMPLETE")
    assert cached == ["built", "reused", "reused"]
    sha = transfer.weights_sha256(transfer.resolve_weights(BACKBONES["efficientnet_lite0"], 128, None).path)
    for run in runs:
        if run.data.tags.get("search.state") == "COMPLETE":
            assert run.data.tags["search.weights_sha256"] == sha
            assert run.data.tags["search.weights_file"].startswith("efficientnet_lite0_imagenet_")
    assert summary.best_value > 0.5  # ImageNet features separate five breeds after two head epochs


@pytest.mark.slow
def test_the_transfer_benchmark_prints_each_backbone_together_and_the_ensemble(dogs_dir, workdir, capsys):
    from search.bench import transfer as bench

    assert bench.main(["--backbones", "efficientnet_lite0,efficientnet_lite1", "--data-dir", str(dogs_dir),
                       "--breeds", "3", "--subset", "60", "--image-size", "64", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s float32 matmul" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| lite") or line.startswith("| ensemble")]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["lite0", "lite1", "lite0+lite1"]
    assert rows[3].startswith("| ensemble: ")
