"""Heads trained on cached features: one backbone or several together, mirror augmentation, mirror TTA.

A frozen backbone's outputs never change, so runners.features computes them once per backbone (for each
photo and for its mirror image) and a head trains on them in seconds. Three things ride on that cache:
- several backbones in one model: a trial's `backbone` may join names with '+'
  (`efficientnet_lite0+efficientnet_lite1`); their pooled features are concatenated, each backbone's cached
  once and shared by every combination that uses it. With `head_init: imagenet` each backbone's block of the
  softmax kernel starts from its own ImageNet classifier (rows matched per breed) divided by the number of
  backbones, so the head starts as the mean of the backbones' ImageNet logits and trains on from there;
- `augmentation: mirror`: the head trains on each photo and on its mirror image (twice the examples);
- mirror test-time augmentation: after training, the mean of a photo's and its mirror's probabilities is
  scored on validation against the photo alone, and kept only when validation is more accurate with it; the
  saved model then feeds every photo and its mirror through the backbones itself.
The saved model takes images like every other trial's: image -> each backbone -> pooling -> concatenation
-> head (-> mean with the mirror's), built from standard Keras layers only, so it loads without this code.
"""
from __future__ import annotations

import math
import time

import keras
import numpy as np
from keras import layers

from runners import features, train
from runners.backbones import Backbone, Weights, build_backbone, imagenet_classifier, members, preprocessing
from runners.cpu_forward import forward_in_batches
from runners.datasets import Dataset
from runners.device import float32_models
from runners.pipeline import evaluation_batches, one_hot
from runners.progress import long_work_bar
from runners.train import TrialResult, fit_callbacks, make_loss, make_optimizer, result_of


# ---------------------------------------------------------------- the cache, per backbone


def embedder(backbone_model: keras.Model, backbone: Backbone, image_size: int, batch_size: int = 64,
             litert: bool | None = None):
    """A function images (N, H, W, 3) uint8 -> (average-pooled, max-pooled) float32 features; on a CPU through
    LiteRT (runners.cpu_forward: twice TensorFlow's rate on an AVX2 CPU) where its conversion pays, or as `litert`
    says."""
    with float32_models():
        inputs = keras.Input((image_size, image_size, 3))
        feature_map = backbone_model(preprocessing(backbone)(inputs), training=False)
        pooled = keras.Model(inputs, [layers.GlobalAveragePooling2D()(feature_map),
                                      layers.GlobalMaxPooling2D()(feature_map)])

    def embed(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        forward = forward_in_batches(pooled, batch_size, len(images), image_size, litert=litert,
                                     key=(backbone_model, image_size))
        return outputs_over(images, forward, image_size, f"embedding with {backbone.name}")

    return embed


def outputs_over(images: np.ndarray, forward: tuple, image_size: int, description: str,
                 dtype=np.float32) -> tuple[np.ndarray, ...]:
    """forward's outputs (runners.cpu_forward.forward_in_batches) for all images, batch by batch, as `dtype`."""
    step, batch = forward
    batches = evaluation_batches(images, np.zeros(len(images), dtype=np.int32), 1, batch, image_size)
    parts = []
    with long_work_bar(len(images), description, "img") as bar:  # minutes on a CPU
        for x, _ in batches:
            parts.append([np.asarray(output, dtype=dtype) for output in step(x)])
            bar.update(len(parts[-1][0]))
    return tuple(np.concatenate(outputs) for outputs in zip(*parts))


# (backbone, input size, weights, dtype policy) -> its frozen model, built once per process: a build with its
# weights took 1.6 s, twice in a head trial of 7.7 s on the dogs (Lite1+Lite2; 30 trials profiled, AMD EPYC
# AVX-512), and every build leaves memory behind that TensorFlow does not give back
FROZEN_BACKBONES: dict[tuple, keras.Model] = {}


def frozen_backbone(backbone: Backbone, image_size: int, weights: Weights) -> keras.Model:
    """The backbone for embedding and for the trials' saved models, shared by every trial of this process.

    Nothing may train it or change its weights (build_frozen_backbone gives a copy of one's own). Calling a
    Keras model in another model records the call on it; those records of earlier trials' models are dropped
    here, so a finished trial's model can be freed."""
    key = (backbone, image_size, weights, keras.mixed_precision.global_policy().name)
    if key not in FROZEN_BACKBONES:
        FROZEN_BACKBONES[key] = build_frozen_backbone(backbone, image_size, weights)
    model = FROZEN_BACKBONES[key]
    model._inbound_nodes.clear()   # Keras keeps no public way to forget a call; a built model has none of its own
    model._outbound_nodes.clear()
    return model


def build_frozen_backbone(backbone: Backbone, image_size: int, weights: Weights) -> keras.Model:
    """A new backbone with its weights: float32 on a CPU (frozen, it only runs forward, which is faster in float32)."""
    with float32_models():
        return build_backbone(backbone, image_size, weights)


def feature_set(data: Dataset, backbone: Backbone, weights: Weights, workdir) -> tuple[features.FeatureSet, keras.Model]:
    """The cached features of data for this backbone and weights (built on first use), and the frozen backbone."""
    backbone_model = frozen_backbone(backbone, data.image_size, weights)
    key = features.cache_key(backbone.name, weights.sha256, data.image_size, data)
    found = features.cached_features(workdir, key, data, embedder(backbone_model, backbone, data.image_size))
    return found, backbone_model


def stacked(caches: list[features.FeatureSet], split: str, pooling: str, view: str = "original") -> np.ndarray:
    """One split's features of every backbone side by side: (N, sum of their widths)."""
    return np.concatenate([np.asarray(c.split(split, pooling, view)[0]) for c in caches], axis=1)


# ---------------------------------------------------------------- the head


def build_head(params: dict, feature_dim: int, n_classes: int) -> keras.Model:
    """Dense layers of `dense_units` with dropout, then a softmax over n_classes, on pooled features."""
    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, train.classifier_head(inputs, params, n_classes), name="head")


def init_from_imagenet(head: keras.Model, classifiers: list[tuple[np.ndarray, np.ndarray]],
                       blocks: list[np.ndarray], y_train: np.ndarray) -> list[list[int]]:
    """Start each class's softmax row from the ImageNet class its training images score highest on, per backbone.

    Each classifier was trained on ~1,300 images per class, against the ~100 a breed has here, so this starts
    the head where ImageNet left it (for the dogs: 84% test top-1 against 80% from a random start, measured
    on Lite0 at 288 px). With several backbones (their feature blocks side by side), each block starts from its
    own classifier divided by their number: the start is the mean of their ImageNet logits. The match uses
    training images only. Returns the matched ImageNet class per class, per backbone."""
    layer = head.get_layer("probabilities")
    new_kernel, new_bias = (np.array(w) for w in layer.get_weights())
    share, row, matched = 1.0 / len(classifiers), 0, []
    new_bias[:] = 0.0
    for (kernel, bias), x_train in zip(classifiers, blocks):
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(x_train @ kernel + bias))
        block = slice(row, row + kernel.shape[0])
        chosen = []
        for c in range(new_kernel.shape[1]):
            own = probabilities[y_train == c]
            best = int(own.mean(axis=0).argmax()) if len(own) else -1  # no training image: the random row stays
            if best >= 0:
                new_kernel[block, c], new_bias[c] = kernel[:, best] * share, new_bias[c] + bias[best] * share
            chosen.append(best)
        matched.append(chosen)
        row += kernel.shape[0]
    layer.set_weights([new_kernel, new_bias])
    return matched


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


def compile_model(model: keras.Model, params: dict, steps: int, epochs: int) -> None:
    """The trial's optimiser and loss, with top-1 and top-3 accuracy."""
    model.compile(optimizer=make_optimizer(params, steps, epochs), loss=make_loss(params),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                           keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy")])


# ---------------------------------------------------------------- the model that takes images


def mirrored(image_size: int):
    """A layer flipping images left to right, from standard layers (a fixed permutation of the width axis),
    so a saved model with mirror TTA loads anywhere without this code."""
    flip = layers.Dense(image_size, use_bias=False, trainable=False, name="mirror")
    flip.build((None, image_size))
    flip.set_weights([np.eye(image_size, dtype=np.float32)[::-1]])

    def apply(x):
        x = layers.Permute((1, 3, 2))(x)          # (H, C, W): the width last, for the Dense to permute
        return layers.Permute((1, 3, 2))(flip(x))

    return apply


def build_model(backbone_models: list[keras.Model], backbones: list[Backbone], head: keras.Model, params: dict,
                image_size: int, mirror_tta: bool = False) -> keras.Model:
    """image -> each backbone (batch norm in inference mode) -> pooling -> concatenation -> head; with
    `mirror_tta` the mean of the head's answers for the image and for its mirror image."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    pool = (layers.GlobalMaxPooling2D(name="pool") if params.get("pooling") == "max"
            else layers.GlobalAveragePooling2D(name="pool"))
    steps = [(preprocessing(b, "preprocess" if len(backbones) == 1 else f"preprocess_{b.name}"), model)
             for b, model in zip(backbones, backbone_models)]

    side_by_side = layers.Concatenate(name="features")

    def answer(images):
        pooled = [pool(model(prepare(images), training=False)) for prepare, model in steps]
        return head(pooled[0] if len(pooled) == 1 else side_by_side(pooled))

    outputs = answer(inputs)
    if mirror_tta:
        outputs = layers.Average(name="mirror_tta")([outputs, answer(mirrored(image_size)(inputs))])
    name = "+".join(b.name for b in backbones)
    return keras.Model(inputs, outputs, name=f"transfer_{name.replace('+', '_and_')}")


def ensemble_model(trials: list[tuple[dict, keras.Model, float]], image_size: int) -> keras.Model | None:
    """The weighted sum of several trials' answers as one model that runs each backbone once per view.

    `trials`: (the trial's parameters, its saved model, its weight). Trials on cached features share their frozen
    ImageNet backbones, so only their heads (and whether they average the mirror image) differ: the image goes
    through each backbone once (twice with a mirror), every head reads its own pooled features. None when a
    member trained through its backbone (its backbone is its own): the caller then sums whole models."""
    if not all(p.get("mode", "frozen") == "frozen" and p.get("augmentation", "none") in ("none", "mirror")
               for p, _, _ in trials):
        return None
    inputs = keras.Input((image_size, image_size, 3), name="image")
    views = {"original": inputs}
    shared: dict = {}   # (kind, name) -> the preprocessing or backbone layer; (name, view) -> feature map; (name, pooling, view) -> pooled

    def pooled(backbone: Backbone, pooling: str, view: str, owner: keras.Model):
        if view not in views:
            views[view] = mirrored(image_size)(inputs)
        if (backbone.name, view) not in shared:  # one backbone layer per name: the first member's serves all views
            prepare = shared.setdefault(("prepare", backbone.name),
                                        preprocessing(backbone, f"preprocess_{backbone.name}"))
            model = shared.setdefault(("model", backbone.name), owner.get_layer(backbone.name))
            shared[(backbone.name, view)] = model(prepare(views[view]), training=False)
        if (backbone.name, pooling, view) not in shared:
            pool = layers.GlobalMaxPooling2D if pooling == "max" else layers.GlobalAveragePooling2D
            shared[(backbone.name, pooling, view)] = pool(name=f"pool_{pooling}_{backbone.name}_{view}")(
                shared[(backbone.name, view)])
        return shared[(backbone.name, pooling, view)]

    answers = []
    for index, (params, model, weight) in enumerate(trials):
        backbones = members(params["backbone"])
        saved_head = model.get_layer("head")
        head = keras.Model(saved_head.inputs[0], saved_head.outputs[0], name=f"head_{index}")  # unique names
        tta = any(layer.name == "mirror_tta" for layer in model.layers)
        outputs = []
        for view in ("original", "mirror") if tta else ("original",):
            blocks = [pooled(b, params.get("pooling", "average"), view, model) for b in backbones]
            outputs.append(head(blocks[0] if len(blocks) == 1 else
                                layers.Concatenate(name=f"features_{index}_{view}")(blocks)))
        answer = outputs[0] if len(outputs) == 1 else layers.Average(name=f"mirror_tta_{index}")(outputs)
        answers.append(layers.Rescaling(weight, name=f"weight_{index}")(answer))
    outputs = answers[0] if len(answers) == 1 else layers.Add(name="ensemble")(answers)
    return keras.Model(inputs, outputs, name="ensemble")


# ---------------------------------------------------------------- the trial


def train_on_cached_features(params: dict, data: Dataset, backbones: list[Backbone], weights: list[Weights], *,
                             epochs: int, patience: int, callbacks, evaluate_test: bool, workdir,
                             checkpoint=None) -> TrialResult:
    """Fit the head on cached pooled features; the returned model is backbones + that head, taking images.

    Keras shuffles these in-memory arrays itself: a resumed head trains on other orders than an
    uninterrupted one would (the same images, the same state)."""
    built = [feature_set(data, b, w, workdir) for b, w in zip(backbones, weights)]
    caches = [cache for cache, _ in built]
    pooling, n_classes = params.get("pooling", "average"), len(data.class_names)
    y_train, y_val = caches[0].labels["train"], caches[0].labels["val"]
    x_train = stacked(caches, "train", pooling)
    if params.get("augmentation") == "mirror":  # each photo and its mirror image, as two examples
        x_train, y_train = np.concatenate([x_train, stacked(caches, "train", pooling, "mirror")]), np.tile(y_train, 2)
    x_val = stacked(caches, "val", pooling)
    head = build_head(params, x_train.shape[1], n_classes)
    matched = None
    if params.get("head_init") == "imagenet":
        blocks = [np.asarray(c.split("train", "average")[0]) for c in caches]
        matched = init_from_imagenet(head, [imagenet_classifier(b, w) for b, w in zip(backbones, weights)],
                                     blocks, caches[0].labels["train"])
        regularize_toward_start(head, params.get("l2_sp", 0.0))
    compile_model(head, params, math.ceil(len(y_train) / params["batch_size"]), epochs)
    history, seconds, first = train.fit_resumable(
        head, lambda first_epoch: x_train, (x_val, one_hot(y_val, n_classes)),
        epochs=epochs, own_callbacks=fit_callbacks(params, patience), callbacks=list(callbacks or []),
        checkpoint=checkpoint, y=one_hot(y_train, n_classes), batch_size=params["batch_size"], shuffle=True)
    result = result_of(history, seconds, head)
    result.resumed_from_epoch = first
    tta = choose_mirror_tta(head, caches, pooling, y_val)
    if tta["adopted"]:  # the saved model answers with the mirror's help, so its validation accuracy is this one
        result.val_accuracy = tta["val_accuracy_mirror_tta"]
    result.val_probabilities = predict(head, caches, "val", pooling, tta["adopted"])
    result.model = build_model([m for _, m in built], backbones, head, params, data.image_size, tta["adopted"])
    result.param_count = result.model.count_params()
    if evaluate_test:
        started = time.perf_counter()
        probabilities = predict(head, caches, "test", pooling, tta["adopted"])
        head_seconds = time.perf_counter() - started
        result.test = test_metrics(probabilities, caches[0].labels["test"], n_classes, params, head_seconds)
        # the backbones' share, from the cache builds (their rates counted both views)
        result.test["inference_ms"] += (1 + tta["adopted"]) * sum(1000.0 / c.images_per_second for c in caches)
        result.test_probabilities = probabilities
    result.tags.update({"search.feature_cache": ",".join("built" if c.built else "reused" for c in caches),
                        "search.feature_cache_key": ",".join(c.key for c in caches),
                        "search.mirror_tta": "adopted" if tta["adopted"] else "not adopted",
                        "search.val_accuracy_plain": f"{tta['val_accuracy_plain']:.4f}",
                        "search.val_accuracy_mirror_tta": f"{tta['val_accuracy_mirror_tta']:.4f}"})
    if matched is not None:
        result.tags["search.head_init_imagenet_classes"] = ";".join(",".join(map(str, m)) for m in matched)
    return result


def predict(head: keras.Model, caches: list[features.FeatureSet], split: str, pooling: str, mirror_tta: bool) -> np.ndarray:
    """The head's probabilities for one split, averaged with the mirror images' when `mirror_tta`."""
    probabilities = head.predict(stacked(caches, split, pooling), batch_size=1024, verbose=0)
    if mirror_tta:
        probabilities = (probabilities + head.predict(stacked(caches, split, pooling, "mirror"), batch_size=1024,
                                                      verbose=0)) / 2
    return probabilities


def choose_mirror_tta(head: keras.Model, caches: list[features.FeatureSet], pooling: str, y_val: np.ndarray) -> dict:
    """Validation accuracy of the head alone and with mirror TTA; TTA is adopted only when strictly better."""
    plain = float(np.mean(predict(head, caches, "val", pooling, False).argmax(axis=1) == y_val))
    with_mirror = float(np.mean(predict(head, caches, "val", pooling, True).argmax(axis=1) == y_val))
    return {"adopted": with_mirror > plain, "val_accuracy_plain": plain, "val_accuracy_mirror_tta": with_mirror}


def test_metrics(probabilities: np.ndarray, y: np.ndarray, n_classes: int, params: dict, seconds: float) -> dict:
    """Test top-1, top-3 and loss, named as runners.train.evaluate names them."""
    top3 = np.argsort(probabilities, axis=1)[:, -3:]
    loss = make_loss(params)(np.eye(n_classes, dtype=np.float32)[y], probabilities)
    return {"test_accuracy": float(np.mean(top3[:, -1] == y)),
            "test_top3_accuracy": float(np.mean((top3 == y[:, None]).any(axis=1))),
            "test_loss": float(keras.ops.convert_to_numpy(loss)), "test_seconds": seconds,
            "inference_ms": 1000.0 * seconds / max(1, len(y))}
