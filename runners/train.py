"""Train one configuration and evaluate it: the part of a trial that is Keras and nothing else.

`train_and_evaluate` takes plain parameters and a Dataset, builds the pipeline and the model, fits with
early stopping on validation accuracy (best weights restored), and evaluates the test split once, only
for a trial that completed. The caller adds its own callbacks (Optuna reporting, MLflow logging).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from runners.datasets import Dataset
from runners.pipeline import evaluation_batches, training_batches
from runners.callbacks import (Deadline, EpochCheckpoint, EpochClock, PreciseBatchNorm,  # noqa: F401
                               all_layers, checkpoint_state, fit_interruptibly)
from runners.protocol import ArchitectureError  # noqa: F401  (raised by the models; re-exported here)


log = logging.getLogger("search")


@dataclass
class TrialResult:
    """What a finished training run measured, ready to log."""

    history: dict[str, list[float]]
    best_epoch: int
    val_accuracy: float
    val_loss: float
    val_top3_accuracy: float
    param_count: int
    fit_seconds: float
    epochs_run: int
    test: dict[str, float] = field(default_factory=dict)
    test_probabilities: np.ndarray | None = None
    val_probabilities: np.ndarray | None = None  # what the saved model answers on validation (for ensembles)
    model: keras.Model | None = None
    tags: dict[str, str] = field(default_factory=dict)  # runner facts for the trial's MLflow run (e.g. weights)
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint rather than trained by this process


def fit_callbacks(params: dict, patience: int) -> list:
    """Epoch timing, NaN stop, early stopping on val_accuracy (best weights restored), plateau LR if asked."""
    chosen = [EpochClock(), keras.callbacks.TerminateOnNaN(),
              keras.callbacks.EarlyStopping("val_accuracy", patience=patience, mode="max", restore_best_weights=True)]
    if params.get("lr_schedule") == "plateau":
        chosen.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=1))
    return chosen


def fit_resumable(model: keras.Model, training, validation, *, epochs: int, own_callbacks: list,
                  callbacks: list, checkpoint=None, **fit_args) -> tuple[dict, float, int]:
    """model.fit from the checkpoint's last finished epoch (when there is one), saving one after every epoch.

    `training(first_epoch)` makes the training data, so that its shuffling resumes at that epoch. The
    checkpoint goes after the runner's own callbacks (clock, early stopping: their epoch-end state is saved)
    and a caller's Deadline (its stop is saved too), and before the caller's others (logging, pruning).
    Returns the history of every epoch (restored ones first), the seconds spent training (restored epochs'
    included) and the epoch it resumed from (0: a fresh start)."""
    state = checkpoint_state(checkpoint) if checkpoint else None
    first = state["epoch"] if state else 0
    # a checkpoint whose training had stopped early (killed during the test evaluation) trains no further
    last = first if state and state.get("stopped") else max(epochs, first)
    stateful = [c for c in own_callbacks
                if isinstance(c, (keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau))]
    saver = [EpochCheckpoint(checkpoint, stateful)] if checkpoint else []
    deadlines = [c for c in callbacks if isinstance(c, Deadline)]
    others = [c for c in callbacks if not isinstance(c, Deadline)]
    started = time.perf_counter()
    # Ctrl-C: the first press stops at the next batch end, a second at once, even inside a long step
    fit = fit_interruptibly(model, training(first), validation_data=validation, initial_epoch=first, epochs=last,
                            verbose=0, callbacks=[*own_callbacks, *deadlines, *saver, *others], **fit_args)
    restored = state["history"] if state else {}
    seconds = time.perf_counter() - started + sum(restored.get("epoch_seconds", []))
    history = {k: list(restored.get(k, [])) + list(fit.history.get(k, [])) for k in {*restored, *fit.history}}
    return history, seconds, first


def classifier_head(x, params: dict, n_classes: int, units: list[int] | None = None, dropout: str = "each"):
    """Dense layers (`units`, else `dense_layers` of `dense_units`) with dropout after each (or the last), then a softmax."""
    from keras import layers

    if units is None:
        units = [params.get("dense_units")] * params.get("dense_layers", 0)
    for index, width in enumerate(units):
        x = layers.Dense(width, activation="relu")(x)
        if dropout == "each" or index == len(units) - 1:
            x = layers.Dropout(params["dropout"])(x)
    if not units:
        x = layers.Dropout(params["dropout"])(x)
    # float32 output keeps softmax stable under mixed precision
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


# Warm-up schedules as fractions of the trial's steps: one-cycle rises from lr/25 over the first 30%
# (as fast CIFAR-10 training does); warm-up + cosine rises from 0 over the first 5%. Both then decay to 0.
WARMUP = {"one_cycle": (0.30, 1 / 25), "warmup_cosine": (0.05, 0.0)}


def learning_rate_schedule(params: dict, steps_per_epoch: int, epochs: int):
    """The trial's learning rate: a number, or a Keras schedule over the trial's steps.

    The curves that end at 0 (cosine, one_cycle, warmup_cosine) come as a BudgetedSchedule: a refit's
    Deadline can bring their end forward to the last epoch that fits its time budget."""
    lr = params["learning_rate"]
    schedule = params.get("lr_schedule", "constant")
    total = max(1, epochs * steps_per_epoch)
    if schedule == "inverse_time":
        return keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=steps_per_epoch, decay_rate=0.5)
    if schedule == "cosine":
        return BudgetedSchedule(keras.optimizers.schedules.CosineDecay(lr, decay_steps=total), total)
    if schedule in WARMUP:
        fraction, start = WARMUP[schedule]
        warmup = max(1, int(total * fraction))
        decay = max(1, total - warmup)
        return BudgetedSchedule(keras.optimizers.schedules.CosineDecay(lr * start, decay_steps=decay,
                                                                       warmup_target=lr, warmup_steps=warmup),
                                warmup + decay)
    return lr  # constant, and plateau (ReduceLROnPlateau lowers it from a callback)


@keras.saving.register_keras_serializable(package="runners")
class BudgetedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate curve planned over `steps` steps whose end can be moved during training (never past them).

    Until `finish_by` is called, the rate at step s is exactly curve(s). `finish_by(end, now)` makes what is
    left of the curve after step `now` run over the steps from `now` to `end`: the rate goes on from where it
    was, faster (or slower again), and reaches the curve's end (0) at step `end`; later steps stay there. The
    refit's Deadline calls it after every epoch with the last epoch that fits before its deadline. The end and the
    point of the change are variables, so the compiled train step reads their values at each step.
    Saved models keep the curve and its planned steps (get_config), not a brought-forward end; loading one
    with its optimizer (compile=True) needs this module imported (the class registered), as for any custom
    Keras object."""

    def __init__(self, curve, steps):
        super().__init__()
        self.curve, self.steps = curve, float(steps)

        def variable(value, name):  # float32 whatever the mixed-precision policy: step counts in bfloat16 fail
            return keras.Variable(value, dtype="float32", trainable=False, autocast=False, name=name)

        self.end = variable(self.steps, "schedule_end")          # the step at which the curve ends
        self.since_step = variable(0.0, "schedule_since_step")   # the step of the last change of the end
        self.since_at = variable(0.0, "schedule_since_at")       # where on the planned curve that step was

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        since_step, since_at = ops.convert_to_tensor(self.since_step), ops.convert_to_tensor(self.since_at)
        # planned steps per step: exactly 1 until finish_by, so the rate is then exactly curve(step)
        speed = (self.steps - since_at) / ops.maximum(ops.convert_to_tensor(self.end) - since_step, 1.0)
        return self.curve(ops.minimum(since_at + (step - since_step) * speed, self.steps))

    def position(self, step: float) -> float:
        """Where on the planned curve step `step` is (the step itself until the end is brought forward)."""
        since_step, since_at, end = (float(v.numpy()) for v in (self.since_step, self.since_at, self.end))
        return min(since_at + (step - since_step) * (self.steps - since_at) / max(end - since_step, 1.0), self.steps)

    def finish_by(self, end: float, now: float) -> bool:
        """Make the curve end at step `end` (counted from 0, as the optimiser's iterations), continuing from its
        value at step `now`: earlier than planned, or later again after an earlier call, never past the planned
        steps; returns False (nothing changed) when `end` is the current end, past the plan, or not after `now`."""
        end, now = float(end), float(now)
        if not now < end <= self.steps or end == float(self.end.numpy()):
            return False
        at = self.position(now)
        self.since_step.assign(now)
        self.since_at.assign(at)
        self.end.assign(end)
        return True

    def get_config(self):
        return {"curve": keras.saving.serialize_keras_object(self.curve), "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["curve"]), config["steps"])


def make_optimizer(params: dict, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """The optimiser and learning-rate schedule a trial asked for."""
    lr = learning_rate_schedule(params, steps_per_epoch, epochs)
    name = params.get("optimizer", "adam")
    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=params.get("weight_decay", 1e-4))
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=params.get("momentum", 0.9), nesterov=True,
                                    weight_decay=params.get("weight_decay"))
    raise ValueError(f"unknown optimizer '{name}'; known: adam, adamw, rmsprop, sgd")


def forward_flops(model) -> float:
    """Floating-point operations of one image's forward pass: 2 x the multiply-adds of convolutions and dense layers."""
    from keras import layers

    macs = 0.0
    for layer in all_layers(model):
        if isinstance(layer, (layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Conv2D, layers.Dense)):
            out = tuple(layer.output.shape)
            positions = math.prod(d for d in out[1:-1] if d)  # output pixels (1 for a dense layer on vectors)
            if isinstance(layer, layers.DepthwiseConv2D):
                macs += positions * out[-1] * math.prod(layer.kernel_size)
            elif isinstance(layer, layers.SeparableConv2D):
                cin = layer.depthwise_kernel.shape[2]
                macs += positions * cin * layer.depth_multiplier * (math.prod(layer.kernel_size) + out[-1])
            else:
                macs += positions * math.prod(layer.kernel.shape)  # kh x kw x cin/groups x cout, or in x out
    return 2 * macs


def make_loss(params: dict) -> keras.losses.Loss:
    """Categorical cross-entropy (with label smoothing) or mean squared error on one-hot labels."""
    name = params.get("loss", "categorical_crossentropy")
    if name == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=params.get("label_smoothing", 0.0))
    if name in ("mean_squared_error", "mse"):
        return keras.losses.MeanSquaredError()
    raise ValueError(f"unknown loss '{name}'; known: categorical_crossentropy, mean_squared_error")


def train_and_evaluate(params: dict, data: Dataset, build_model, *, epochs: int, patience: int, seed: int,
                       recipes: dict, callbacks: list | None = None, evaluate_test: bool = True,
                       options: dict | None = None, checkpoint=None) -> TrialResult:
    """Fit a model built from params on data's train split; validate every epoch; test once at the end.

    `options` carries run-wide settings a model may need (weights file, workdir); "initial_weights", a saved
    model of the same configuration, starts training from its weights (a refit's warm restart) instead of
    random ones. `checkpoint`: a folder where the training state is kept after every epoch; when it holds one,
    training continues from that epoch (see EpochCheckpoint)."""
    keras.utils.set_random_seed(seed)
    size, n_classes, batch = data.image_size, len(data.class_names), params["batch_size"]
    x_train, y_train = data.splits["train"]
    x_val, y_val = data.splits["val"]
    steps = math.ceil(len(y_train) / batch)
    model = build_model(params, size, n_classes)
    if (options or {}).get("initial_weights"):
        model.load_weights(options["initial_weights"])  # a checkpoint, when there is one, replaces them below
    model.compile(optimizer=make_optimizer(params, steps, epochs), loss=make_loss(params),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                           keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy")])
    recipe = recipes[params.get("augmentation", "none")]
    eval_batch = evaluation_batch_size(size, batch)
    val = evaluation_batches(x_val, y_val, n_classes, eval_batch, size)
    history, fit_seconds, first = fit_resumable(
        model, lambda first_epoch: training_batches(x_train, y_train, n_classes, batch, recipe, size, seed,
                                                    first_epoch=first_epoch),
        val, epochs=epochs, callbacks=list(callbacks or []),
        own_callbacks=[*fit_callbacks(params, patience), PreciseBatchNorm(x_train, eval_batch)],
        checkpoint=checkpoint, shuffle=False)
    result = result_of(history, fit_seconds, model)
    result.resumed_from_epoch = first
    if evaluate_test:
        result.test, result.test_probabilities = evaluate(model, data, params)
        result.val_probabilities = val_probabilities(model, data, params)
    return result


def evaluation_batch_size(image_size: int, batch_size: int) -> int:
    """Large batches for small images, the training batch for large ones: a 256-image batch at 128 px holds
    ~0.5 GB per activation of a 32-filter layer and set a dogs trial's peak memory (3.6 GiB measured)."""
    return max(batch_size, min(256, int(256 * (32 / image_size) ** 2)))


def result_of(history: dict, fit_seconds: float, model: keras.Model) -> TrialResult:
    """The best epoch's validation figures from a fit's history; a NaN loss fails the trial."""
    history = {k: [float(v) for v in values] for k, values in history.items()}
    if any(not np.isfinite(v) for v in history.get("loss", [])):
        raise FloatingPointError(f"loss became NaN or infinite at epoch {len(history['loss'])}; "
                                 "the learning rate is probably too high for this configuration")
    best = int(np.argmax(history["val_accuracy"]))
    return TrialResult(history=history, best_epoch=best + 1, val_accuracy=history["val_accuracy"][best],
                       val_loss=history["val_loss"][best], val_top3_accuracy=history["val_top3_accuracy"][best],
                       param_count=model.count_params(), fit_seconds=fit_seconds, epochs_run=len(history["loss"]),
                       model=model)


def evaluate(model: keras.Model, data: Dataset, params: dict) -> tuple[dict, np.ndarray]:
    """Test top-1, top-3 and loss (mirrored views averaged in when `test_time_flip`), and the time per image."""
    y = data.splits["test"][1]
    n_classes = len(data.class_names)
    started = time.perf_counter()
    views = predictions(model, data, params, "test")
    seconds = (time.perf_counter() - started) / len(views)  # one pass: what the saved model costs per photo
    probabilities = np.mean(views, axis=0)
    top3 = np.argsort(probabilities, axis=1)[:, -3:]
    loss = make_loss(params)(np.eye(n_classes, dtype=np.float32)[y], probabilities)
    metrics = {"test_accuracy": float(np.mean(top3[:, -1] == y)),
               "test_top3_accuracy": float(np.mean((top3 == y[:, None]).any(axis=1))),
               "test_loss": float(keras.ops.convert_to_numpy(loss)),
               "test_seconds": seconds,
               "inference_ms": 1000.0 * seconds / max(1, len(y))}
    if len(views) > 1:
        metrics["test_accuracy_one_view"] = float(np.mean(np.argmax(views[0], axis=1) == y))
    return metrics, probabilities


def val_probabilities(model: keras.Model, data: Dataset, params: dict) -> np.ndarray:
    """What the model answers on validation, read as the test split is (mirror views averaged): an ensemble
    candidate's answers (search/ensemble.py chooses members on them)."""
    return np.mean(predictions(model, data, params, "val"), axis=0)


def predictions(model: keras.Model, data: Dataset, params: dict, split: str) -> list[np.ndarray]:
    """Softmax outputs on a split: of the photos, then, with `test_time_flip`, of their mirror images.

    Photos of dogs and of CIFAR-10's objects mean the same mirrored, so the mirror image is a second opinion
    that costs one more forward pass (airbench averages it in the same way). Validation accuracy, which picks
    the best epoch and trial, is read without it."""
    x, y = data.splits[split]
    size = evaluation_batch_size(data.image_size, params.get("batch_size", 32))
    batches = evaluation_batches(x, y, len(data.class_names), size, data.image_size).map(lambda images, labels: images)
    views = [model.predict(batches, verbose=0)]
    if params.get("test_time_flip"):
        views.append(model.predict(batches.map(lambda images: tf.reverse(images, axis=[2])), verbose=0))
    return views


def release(result: TrialResult | None = None) -> None:
    """Free a trial's model and graphs, so memory stays flat over a long study."""
    if result is not None:
        result.model = None
    keras.backend.clear_session(free_memory=False)
    gc.collect(1)  # the young generations hold a finished trial's garbage; a full collection costs ~0.4 s
