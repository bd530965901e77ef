"""Fine-tuning EfficientNet-Lite's last stage on cached activations (mode last_stage), on real dog photos."""
import time

import keras
import numpy as np
import pytest

from runners import feature_heads, lite, transfer
from runners.transfer import BACKBONES, resolve_weights
from tests.test_transfer import default_params, small_dogs


def test_the_backbone_cut_before_its_last_stage_computes_what_the_whole_backbone_does():
    model = lite.build_backbone("efficientnet_lite1", (96, 96, 3))
    prefix, tail = lite.split_before_last_stage(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    np.testing.assert_allclose(tail.predict(prefix.predict(images, verbose=0), verbose=0),
                               model.predict(images, verbose=0), atol=1e-4)
    assert {layer.name.split("_")[0] for layer in tail.layers if layer.weights} == {"stage7", "head"}


def test_a_last_stage_trial_keeps_the_tuned_stage_when_validation_gains_and_its_saved_model_takes_images(
        dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64)
    # a probe that barely learns (1e-5), then the stage and head at 300x that: step 2 has room to gain
    params = default_params(mode="last_stage", head_init="random", learning_rate=1e-5, fine_tune_epochs=3,
                            fine_tune_lr_factor=300.0, l2_sp=0.0, batch_size=16)
    result = transfer.train_and_evaluate(params, data, epochs=1, patience=3, seed=0, recipes={},
                                         options={"workdir": str(workdir)})
    assert result.tags["search.last_stage"] == "adopted" and result.tags["search.activation_cache"] == "built"
    assert result.epochs_run == 4  # 1 epoch of the head alone, 3 of the stage with it
    assert list((workdir / "cache" / "activations").glob("*/train_activations_mirror.npy"))
    imagenet = lite.build_backbone("efficientnet_lite0", (64, 64, 3))
    tuned = result.model.get_layer("efficientnet_lite0")
    assert not np.allclose(tuned.get_layer("stage7_block1_project_conv").get_weights()[0],
                           imagenet.get_layer("stage7_block1_project_conv").get_weights()[0])
    np.testing.assert_array_equal(tuned.get_layer("stage6_block1_project_conv").get_weights()[0],
                                  imagenet.get_layer("stage6_block1_project_conv").get_weights()[0])
    backbone = transfer.backbone_named("efficientnet_lite0")  # the head trials' shared backbone stays ImageNet's
    shared = feature_heads.frozen_backbone(backbone, 64, resolve_weights(backbone, 64, None))
    assert shared is not tuned
    np.testing.assert_array_equal(shared.get_layer("stage7_block1_project_conv").get_weights()[0],
                                  imagenet.get_layer("stage7_block1_project_conv").get_weights()[0])
    path = workdir / "last_stage.keras"
    result.model.save(path)
    answers = keras.models.load_model(path, compile=False).predict(data.splits["test"][0].astype("float32"),
                                                                   verbose=0)
    np.testing.assert_allclose(answers, result.test_probabilities, atol=2e-3)  # activations cached in float16
    again = transfer.train_and_evaluate(params, data, epochs=1, patience=3, seed=0, recipes={},
                                        options={"workdir": str(workdir)})
    assert again.tags["search.activation_cache"] == "reused"


def test_last_stage_takes_one_efficientnet_lite_backbone_on_cached_views_and_a_budget_it_fits(dogs_dir, workdir):
    data = small_dogs(dogs_dir, workdir, image_size=64, subset=12)
    for changes, message in [({"backbone": "efficientnet_lite0+efficientnet_lite1"}, "one backbone's last stage, not"),
                             ({"augmentation": "flip"}, "augmentation none or mirror, not flip")]:
        with pytest.raises(transfer.ArchitectureError, match=message):
            transfer.train_and_evaluate(default_params(mode="last_stage", **changes), data, epochs=1, patience=1,
                                        seed=0, recipes={}, options={"workdir": str(workdir)})
    lite0 = BACKBONES["efficientnet_lite0"]
    transfer.feature_set(data, lite0, resolve_weights(lite0, 64, None), workdir)  # its embedding rate is known
    params = default_params(mode="last_stage", fine_tune_epochs=1, fine_tune_lr_factor=0.1)
    with pytest.raises(transfer.ArchitectureError, match="last stage and its activations' build take"):
        transfer.train_and_evaluate(params, data, epochs=1, patience=1, seed=0, recipes={},
                                    options={"workdir": str(workdir), "budget_end": time.time() - 1})
    assert not (workdir / "cache" / "activations").exists()  # refused before any work
