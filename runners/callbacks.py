"""The Keras callbacks a trial trains with: epoch timing, the epoch hook, the deadline, batch-norm statistics
re-estimated before each validation, the progress line, checkpoints that make a trial resumable, and Ctrl-C at a
batch end."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np

from runners.progress import live_bar

log = logging.getLogger("search")


class EpochClock(keras.callbacks.Callback):
    """Adds epoch_seconds and learning_rate to each epoch's logs, for every callback after it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_seconds"] = time.perf_counter() - self.started
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class EachEpoch(keras.callbacks.Callback):
    """Calls `record(epoch, logs)` after every epoch (epoch from 1): how a caller sees epochs without Keras."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch + 1, dict(logs or {}))


class Deadline(keras.callbacks.Callback):
    """Stops training after an epoch when one more epoch, as long as the typical one (the median of those after the
    first, which also traces the graphs), would end past `at` (Unix seconds).

    A refit plans its epochs from the explored trial's speed; on a shared machine they can run 25% slower, and
    without this a round planned to end with the budget ended ten minutes after it. The best epoch's weights
    are still restored (early stopping's). A learning-rate schedule whose end can move (a BudgetedSchedule of
    runners.train: one_cycle, warmup_cosine, cosine) is made to end with the last epoch that fits, after every
    epoch, so that training stopped by the deadline still ends annealed rather than at a high learning rate, and
    no epoch trains at a learning rate of 0 because the end was brought too far forward."""

    def __init__(self, at: float):
        super().__init__()
        self.at, self.stopped_at_epoch = at, None
        self.seconds: list[float] = []  # each epoch's, validation included

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()
        self.first_step = self.steps_done()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.monotonic() - self.started)
        # the first epoch also traces the graphs (a refit round's took 19 s against 16 s for the next ones): once
        # later epochs are timed, they say what another costs; planning from the first ended a schedule 3 epochs early
        seconds = float(np.median(self.seconds[1:] or self.seconds))
        remaining = self.at - time.time()
        if remaining < seconds:
            self.model.stop_training, self.stopped_at_epoch = True, epoch + 1
            log.info(f"stopped after epoch {epoch + 1}: another would end past the time budget")
            return
        schedule = self.schedule()
        if schedule is not None and seconds > 0:
            fit = int(remaining // seconds)  # more whole epochs as long as the typical one (1 or more here)
            done = self.steps_done()
            # earlier than planned, or later again when epochs turn out faster (never past the planned epochs);
            # finish_by changes nothing, and says so, when the end is where it was
            end = min(done + fit * (done - self.first_step), schedule.steps)
            if schedule.finish_by(end, done):
                ends_with = min(epoch + 1 + fit, (self.params or {}).get("epochs") or epoch + 1 + fit)
                log.info(f"the learning-rate schedule now ends with epoch {ends_with}: the last that fits "
                         "the time budget")

    def optimizer(self):
        optimizer = getattr(self.model, "optimizer", None)
        return getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own

    def steps_done(self) -> int:
        optimizer = self.optimizer()
        return int(optimizer.iterations.numpy()) if optimizer is not None else 0

    def schedule(self):
        """The optimiser's learning-rate schedule when it can be shortened, else None (a constant rate).

        Keras 3 keeps the schedule object itself in the private `_learning_rate` (the public `learning_rate`
        is its value at the current step): the only place to reach it from a callback."""
        schedule = getattr(self.optimizer(), "_learning_rate", None)
        return schedule if callable(getattr(schedule, "finish_by", None)) else None


PRECISE_BN_IMAGES = 1024  # training images the batch-norm statistics are re-estimated on before each validation


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before each validation, re-estimates every trainable BatchNormalization layer's moving mean and variance from
    the current weights, averaged over batches of `sample` of `images` (unaugmented training images): "precise BN"
    (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). Moving averages lag the weights ~1 / (1 - momentum) steps;
    a short trial makes few (a screen of 3,000 CIFAR-10 images at batch 256 makes 12 an epoch), so it validated on
    statistics of much earlier weights: the space's default screened at 0.347 where its own weights, re-estimated,
    reach 0.463 (AVX2, one run), and every configuration with large batches looked worse than it was."""

    def __init__(self, images: np.ndarray, batch_size: int, sample: int = PRECISE_BN_IMAGES):
        super().__init__()
        # evenly spaced, not the first ones: a photo folder's training split is in breed order
        spread = np.unique(np.linspace(0, len(images) - 1, min(sample, len(images))).astype(int))
        self.images, self.batch_size = np.asarray(images[spread]), batch_size

    def on_test_begin(self, logs=None):
        recalibrate_batch_norm(self.model, self.images, self.batch_size)


def recalibrate_batch_norm(model: keras.Model, images: np.ndarray, batch_size: int) -> None:
    """Set each trainable batch-norm layer's moving statistics to the mean of its batch statistics over `images`
    (a forward pass in training mode per batch; the weights are untouched)."""
    norms = [layer for layer in all_layers(model)
             if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms or not len(images):
        return
    momenta = [layer.momentum for layer in norms]
    try:
        for count, start in enumerate(range(0, len(images), batch_size), start=1):
            for layer in norms:  # moving = moving * m + batch * (1 - m): with m = 1 - 1/count, the running mean
                layer.momentum = 1.0 - 1.0 / count
            model(np.asarray(images[start:start + batch_size], dtype=np.float32), training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def all_layers(model):
    """Every layer, nested models opened."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from all_layers(layer)
        else:
            yield layer


class Progress(keras.callbacks.Callback):
    """Prints one line per epoch: trial n of N, epoch, accuracies, seconds, best so far."""

    def __init__(self, number: int, position: int, target: int, epochs: int, best: float | None,
                 first_epoch: int = 0, where: str | None = None):
        super().__init__()
        self.number, self.epochs, self.best = number, epochs, best
        # "(3 of 10)": never past the target (a refit round, a resumed trial say what they are instead)
        self.where = where or f"{min(position, target)} of {target}"
        self.first_epoch = first_epoch  # epochs trained before this fit (a continued trial): counted on from there
        self.val_history: list[float] = []
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        # a live line inside the epoch (batches done, rate, time left): a CPU epoch can take minutes
        self.bar = live_bar((self.params or {}).get("steps"),
                            f"trial {self.number} epoch {self.first_epoch + epoch + 1}/{self.epochs}", "batch")

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        logs = logs or {}
        value = float(logs.get("val_accuracy", float("nan")))
        self.val_history.append(value)
        if value == value and (self.best is None or value > self.best):  # the best so far moves with this trial
            self.best = value
        best = "-" if self.best is None else f"{self.best:.4f}"
        log.info(f"trial {self.number} ({self.where}) epoch {self.first_epoch + epoch + 1}/{self.epochs}: "
                 f"loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.4f} "
                 f"val_acc {logs.get('val_accuracy', float('nan')):.4f} ({logs.get('epoch_seconds', 0):.1f} s)"
                 f"  best so far {best}")


CHECKPOINT_STATE = "state.json"


def checkpoint_state(folder) -> dict | None:
    """What a trial's checkpoint folder holds about its last finished epoch, or None when it holds none."""
    path = Path(folder) / CHECKPOINT_STATE if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state at the end of every epoch and restores it when a fit begins.

    The state: model and optimiser variables (iterations, learning rate, moments), the dropout layers'
    random-generator states, the epochs done, the history so far, and the counters of early stopping and
    plateau LR, with early stopping's best weights: a resumed epoch trains as the uninterrupted one would.
    Keras's BackupAndRestore does the first two, but overwrites one weights file in place (a kill while it
    writes leaves no usable state) and forgets the rest; here each epoch's weights get a new file and
    `state.json`, replaced atomically, names the files of the last complete epoch. Put it before any
    callback that records the epoch elsewhere: a recorded epoch is then always a saved one."""

    KEPT = ("wait", "best", "best_epoch", "cooldown_counter")

    def __init__(self, folder, stateful: list):
        super().__init__()
        self.folder, self.stateful = Path(folder), stateful
        self.state = checkpoint_state(folder) or {"epoch": 0, "history": {}, "callbacks": [], "files": []}
        self.saved_best: dict[int, object] = {}

    def on_train_begin(self, logs=None):
        # after the other callbacks' on_train_begin, which reset their counters
        if not self.state["epoch"]:
            return
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.folder / self.state["weights"])
        with np.load(self.folder / self.state["random"]) as arrays:
            for i, variable in enumerate(random_states(self.model)):
                variable.assign(arrays[f"arr_{i}"])
        for callback, saved in zip(self.stateful, self.state["callbacks"]):
            for key, value in saved["counters"].items():
                setattr(callback, key, value)
            if saved.get("best_weights"):
                with np.load(self.folder / saved["best_weights"]) as arrays:
                    callback.best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
                self.saved_best[id(callback)] = callback.best_weights

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        done = epoch + 1
        weights = f"epoch-{done}.weights.h5"
        self.model.save_weights(self.folder / weights)
        random = f"epoch-{done}.random.npz"
        np.savez(self.folder / random, *(keras.ops.convert_to_numpy(v) for v in random_states(self.model)))
        history = self.state["history"]
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        self.state.update(epoch=done, weights=weights, random=random, stopped=bool(self.model.stop_training),
                          callbacks=[self.callback_state(i, c, done) for i, c in enumerate(self.stateful)])
        files = {weights, random, *(c["best_weights"] for c in self.state["callbacks"] if c.get("best_weights"))}
        temporary = self.folder / f"{CHECKPOINT_STATE}.tmp"
        temporary.write_text(json.dumps(self.state, default=lambda v: v.item()))
        os.replace(temporary, self.folder / CHECKPOINT_STATE)  # the checkpoint moves to this epoch at once
        for path in self.folder.glob("*"):
            if path.name.startswith(("epoch-", "best-")) and path.name not in files:
                path.unlink()

    def callback_state(self, index: int, callback, done: int) -> dict:
        """A stateful callback's counters, and its best weights when they changed (a new file) or were kept."""
        saved = {"counters": {k: getattr(callback, k) for k in self.KEPT if hasattr(callback, k)}}
        best = getattr(callback, "best_weights", None)
        if best is None:
            return saved
        kept = self.state["callbacks"]
        previous = kept[index] if index < len(kept) else {}
        if self.saved_best.get(id(callback)) is best and previous.get("best_weights"):
            saved["best_weights"] = previous["best_weights"]
        else:
            saved["best_weights"] = f"best-{index}-{done}.npz"
            np.savez(self.folder / saved["best_weights"], *best)
            self.saved_best[id(callback)] = best
        return saved


def random_states(model: keras.Model) -> list:
    """The model's variables that save_weights leaves out: the seed-generator states of dropout layers."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


class StopAtBatchEnd(keras.callbacks.Callback):
    """Ctrl-C during fit raises KeyboardInterrupt at the next batch end, not inside an epoch-end write.

    An interrupt that lands inside a SQLite commit (MLflow's epoch log, Optuna's report) leaves that
    connection holding the database lock, and the trial can then not even be recorded as killed."""

    def __init__(self):
        super().__init__()
        self.pressed = False

    def press(self, signum, frame):
        """The SIGINT handler: remember the press; a second press does not wait."""
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def check(self, *_, **__):
        """Raise KeyboardInterrupt if Ctrl-C was pressed since the last check."""
        if self.pressed:
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_begin = check


@contextmanager
def interrupts_at_batch_end():
    """Within the block, Ctrl-C waits for the yielded callback's next check (or the block's end)."""
    stop = StopAtBatchEnd()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield stop  # someone else owns Ctrl-C here (a worker thread, a notebook)
        return
    previous = signal.signal(signal.SIGINT, stop.press)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
    stop.check()


WAIT_SLICE = 0.25  # seconds the main thread waits for the fit at a time: Ctrl-C's handler runs between slices


def fit_interruptibly(model: keras.Model, *args, callbacks=(), **kwargs):
    """model.fit(*args, callbacks=[StopAtBatchEnd(), *callbacks], **kwargs), a second Ctrl-C acting at once.

    The first Ctrl-C stops the fit with KeyboardInterrupt at the next batch end (StopAtBatchEnd), a second
    raises KeyboardInterrupt here at once. Python runs its signal handlers only when the main thread is back
    in the interpreter, and a training step is one call into TensorFlow's native code that can last minutes
    on a slow CPU; so the fit runs in a worker thread while the main thread waits for it in short slices,
    free to take the presses. Whatever the fit raises is raised here (KeyboardInterrupt at a batch end,
    Optuna's TrialPruned, an error, each as itself), and its History returned. Where Ctrl-C is not Python's
    default (a worker thread, a notebook), the fit runs in this thread, as plain fit does.

    After a second press the worker is left to finish the step in progress (nothing stops native code); it
    then meets the press at the batch end and ends without another step or epoch-end write. It is not a
    daemon thread: the process, when it exits, waits for that step. Exiting under a running step tears
    TensorFlow down under it (measured: SIGSEGV), and TensorFlow's cancellation returns the call at once but
    leaves the step's kernels running, with the same crash at exit."""
    with interrupts_at_batch_end() as stop:
        callbacks = [stop, *callbacks]
        if signal.getsignal(signal.SIGINT) != stop.press:  # not ours to take
            return model.fit(*args, callbacks=callbacks, **kwargs)
        outcome: dict = {}
        ended = threading.Event()
        settings = keras_settings()

        def work():
            use_keras_settings(settings)
            try:
                outcome["history"] = model.fit(*args, callbacks=callbacks, **kwargs)
            except BaseException as err:  # any kind, KeyboardInterrupt included: the caller raises it
                outcome["error"] = err
            finally:
                outcome["settings"] = keras_settings()
                ended.set()

        worker = threading.Thread(target=work, name="fit")
        worker.start()
        try:
            # not worker.join(timeout): in Python 3.11 a KeyboardInterrupt inside join marks the running thread
            # stopped, and the exiting process then no longer waits for it
            while not ended.wait(WAIT_SLICE):
                pass  # a second press raises KeyboardInterrupt here (StopAtBatchEnd.press)
        except KeyboardInterrupt:
            log.info("Ctrl-C twice: training stops; the step in progress ends in the background (an exiting "
                     "process waits for it)")
            raise
        worker.join()
        use_keras_settings(outcome["settings"])  # as if the fit had run in this thread
        if "error" in outcome:
            raise outcome.pop("error")  # the same exception, its traceback in the worker kept
    return outcome["history"]


def keras_settings() -> dict:
    """This thread's Keras settings: Keras keeps its global state per thread (the mixed-precision policy, the
    global random seed and seed generator, ...), and a fit run in a worker thread must see the caller's."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # a Keras that keeps them elsewhere: nothing to carry over
        return {}
    return dict(vars(global_state.GLOBAL_STATE_TRACKER))


def use_keras_settings(settings: dict) -> None:
    """Give this thread the Keras settings `keras_settings()` returned in another."""
    if settings:
        from keras.src.backend.common import global_state

        for name, value in settings.items():
            setattr(global_state.GLOBAL_STATE_TRACKER, name, value)
