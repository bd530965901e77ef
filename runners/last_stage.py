"""Fine-tuning a backbone's last stage on cached activations of the stage before it (`mode: last_stage`).

Through the whole backbone an epoch of the dogs takes minutes to an hour on a 2-core CPU. EfficientNet-Lite's
last stage (one block and the 1x1 head convolution) is a small share of its forward cost, and everything
before it stays frozen, so what reaches the last stage never changes: it is computed once, like the pooled
features (runners.features, `<workdir>/cache/activations/`, float16, each photo and its mirror image).
A trial then, in three steps:
1. the head trains on the cached pooled features (runners.feature_heads: the linear probe, its ImageNet
   start, mirror images, mirror TTA);
2. the last stage and the head train together on the cached activations for `fine_tune_epochs` epochs at
   `learning_rate * fine_tune_lr_factor`, with L2-SP pulling the stage toward its ImageNet weights. Fine-tuning
   from a trained head moves the features less than from a random one (LP-FT, Kumar et al. 2022); batch
   norm stays in inference mode;
3. step 2 is kept only when its validation accuracy beats step 1's; its weights then go back into the
   backbone, so the saved model takes images like every other trial's and loads without this code.
Measured by hand on Lite2 at 288 px, the dogs, one run each (AMD EPYC with AVX512_BF16, float32): an epoch of
step 2 over 17,382 photos and mirror images took 26-41 s (through the whole backbone: minutes); validation
top-1, head alone 87.4%; with step 2 86.4-86.9% (joint from the ImageNet start: 85.8-86.4%). On these photos,
which ImageNet's training set shares, the stage gains little: the search and step 3 decide.
"""
from __future__ import annotations

import math
import time

import keras
import numpy as np
from keras import layers

from runners import features, lite, train
from runners.backbones import Backbone, Weights
from runners.cpu_forward import forward_in_batches
from runners.datasets import Dataset
from runners.feature_heads import (build_frozen_backbone, build_model, compile_model, outputs_over,
                                   regularize_toward_start, test_metrics, train_on_cached_features)
from runners.pipeline import one_hot
from runners.protocol import ArchitectureError
from runners.train import TrialResult, fit_callbacks, result_of

KIND = "activations"  # the one kind of array the activation cache holds per split and view


def activation_key(backbone: Backbone, weights: Weights, data: Dataset) -> str:
    """The activation cache's key: the feature cache's inputs, and where the backbone is cut."""
    return features.cache_key(f"{backbone.name}|before-last-stage", weights.sha256, data.image_size, data)


def activation_embedder(prefix: keras.Model, image_size: int, batch_size: int = 32):
    """A function images (N, H, W, 3) uint8 -> (activations before the last stage (N, h, w, c) float16,)."""

    settled = []  # (forward, batch), settled at the first call (the training split) for every split and view

    def embed(images: np.ndarray) -> tuple[np.ndarray]:
        if not settled:
            settled.append(forward_in_batches(prefix, batch_size, len(images), image_size))
        return outputs_over(images, settled[0], image_size, f"activations of {prefix.name}", dtype=np.float16)

    return embed


def activations_cached(data: Dataset, backbone: Backbone, weights: Weights, workdir) -> bool:
    """Whether this backbone's activations before its last stage are cached for these images."""
    return features.cached_rate(workdir, activation_key(backbone, weights, data), cache="activations") is not None


def train_last_stage(params: dict, data: Dataset, backbone: Backbone, weights: Weights, *, epochs: int,
                     patience: int, callbacks, evaluate_test: bool, workdir) -> TrialResult:
    """The head on cached features, then the last stage with it on cached activations, kept if validation gains."""
    if backbone.application is not None or weights.path is None:
        raise ArchitectureError(f"mode last_stage: {backbone.name} is not an EfficientNet-Lite backbone with ImageNet "
                                "weights (their stages are named and cut there); use mode frozen or fine_tune")
    probe = train_on_cached_features({**params, "mode": "frozen"}, data, [backbone], [weights], epochs=epochs,
                                     patience=patience, callbacks=callbacks, evaluate_test=evaluate_test, workdir=workdir)
    backbone_model, head = probe.model.get_layer(backbone.name), probe.model.get_layer("head")
    prefix, tail = lite.split_before_last_stage(backbone_model)
    cache = features.cached_features(workdir, activation_key(backbone, weights, data), data,
                                     activation_embedder(prefix, data.image_size), kinds=(KIND,), cache="activations")
    tuned = tuned_model(tail, head, params)
    regularize_toward_start(tail, params.get("l2_sp", 0.0))  # toward the ImageNet stage
    n_classes, done = len(data.class_names), len(probe.history["loss"])
    x_train, y_train = train_split(cache, params)
    x_val, y_val = np.asarray(cache.split("val", KIND)[0]), cache.labels["val"]
    step_params = {**params, "learning_rate": params["learning_rate"] * params["fine_tune_lr_factor"]}
    compile_model(tuned, step_params, math.ceil(len(y_train) / params["batch_size"]), params["fine_tune_epochs"])
    started = time.perf_counter()
    more = train.fit_interruptibly(
        tuned, x_train, one_hot(y_train, n_classes), batch_size=params["batch_size"], shuffle=True,
        validation_data=(x_val, one_hot(y_val, n_classes)), initial_epoch=done,
        epochs=done + params["fine_tune_epochs"], verbose=0,
        callbacks=fit_callbacks(step_params, patience) + list(callbacks or []))
    history = {k: list(v) + list(more.history.get(k, [])) for k, v in probe.history.items()}
    plain, mirror = (float(np.mean(predict(tuned, cache, "val", tta).argmax(axis=1) == y_val)) for tta in (False, True))
    adopted = max(plain, mirror) > probe.val_accuracy
    result = result_of(history, probe.fit_seconds + time.perf_counter() - started, probe.model)
    result.resumed_from_epoch = probe.resumed_from_epoch
    result.tags.update({**probe.tags, "search.last_stage": "adopted" if adopted else "not adopted (head alone better)",
                        "search.activation_cache": "built" if cache.built else "reused",
                        "search.val_accuracy_last_stage": f"{max(plain, mirror):.4f}"})
    if not adopted:  # the probe is the trial's model, with its own figures (test too, from the cached features)
        result.val_accuracy, result.val_probabilities = probe.val_accuracy, probe.val_probabilities
        result.test, result.test_probabilities = probe.test, probe.test_probabilities
        return result
    tta = mirror > plain
    backbone_model = build_frozen_backbone(backbone, data.image_size, weights)  # not the trials' shared one
    lite.copy_weights(tail, backbone_model)  # the saved model carries the tuned stage
    result.model = build_model([backbone_model], [backbone], head, params, data.image_size, tta)
    result.val_accuracy, result.val_probabilities = max(plain, mirror), predict(tuned, cache, "val", tta)
    result.tags["search.mirror_tta"] = "adopted" if tta else "not adopted"
    if evaluate_test:
        started = time.perf_counter()
        probabilities = predict(tuned, cache, "test", tta)
        result.test = test_metrics(probabilities, cache.labels["test"], n_classes, params,
                                   time.perf_counter() - started)
        result.test["inference_ms"] += (1 + tta) * 1000.0 / cache.images_per_second  # the frozen stages' share
        result.test_probabilities = probabilities
    return result


def tuned_model(tail: keras.Model, head: keras.Model, params: dict) -> keras.Model:
    """activations -> last stage (trainable, batch norm in inference mode) -> pooling -> the trained head."""
    tail.trainable = True
    for layer in tail.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    pool = layers.GlobalMaxPooling2D() if params.get("pooling") == "max" else layers.GlobalAveragePooling2D()
    inputs = keras.Input(tail.input.shape[1:], name="activations")
    return keras.Model(inputs, head(pool(tail(inputs, training=False))), name="last_stage_and_head")


def train_split(cache: features.FeatureSet, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """The training activations, with the mirror images' as more examples under `augmentation: mirror`."""
    x, y = cache.split("train", KIND)
    if params.get("augmentation") == "mirror":
        return np.concatenate([x, cache.split("train", KIND, "mirror")[0]]), np.tile(y, 2)
    return np.asarray(x), y


def predict(model: keras.Model, cache: features.FeatureSet, split: str, mirror_tta: bool) -> np.ndarray:
    """Probabilities for one split's cached activations, averaged with the mirror images' when `mirror_tta`."""
    probabilities = model.predict(np.asarray(cache.split(split, KIND)[0]), batch_size=256, verbose=0)
    if mirror_tta:
        mirrored = model.predict(np.asarray(cache.split(split, KIND, "mirror")[0]), batch_size=256, verbose=0)
        probabilities = (probabilities + mirrored) / 2
    return probabilities
