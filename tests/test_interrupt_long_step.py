"""Ctrl-C during model.fit (runners.callbacks.fit_interruptibly): the first press stops at the next batch end, a
second at once, even inside a training step that is seconds of TensorFlow's native code."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A stack of wide Dense layers trained on one big batch: each step is seconds of native matrix products (width
# 4096, batch 8192, 4 layers: 3.3 TFLOP, ~6 s on 2 quiet cores, ~13 s at 250 GFLOP/s). A small first batch
# traces the train step (Python code, where any signal handler runs soon); the big batches reuse that trace.
SCRIPT = """
import signal
import sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the parent ignores

import keras
import numpy as np
import tensorflow as tf

from runners.callbacks import fit_interruptibly

width, batch, depth = map(int, sys.argv[1:4])
keras.utils.set_random_seed(0)
inputs = keras.Input((width,))
x = inputs
for _ in range(depth):
    x = keras.layers.Dense(width)(x)
model = keras.Model(inputs, x)
model.compile(optimizer="sgd", loss="mse")
data = np.random.default_rng(0).random((batch, width), dtype=np.float32)
batches = tf.data.Dataset.from_tensors((data[:8], data[:8])).concatenate(
    tf.data.Dataset.from_tensors((data, data)).repeat(2))
options = tf.data.Options()
options.autotune.enabled = False  # tf.data's autotuning thread delays the exit after an interrupted fit by ~4 s
batches = batches.with_options(options)
kernel = model.layers[-1].kernel
before = []


class Markers(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 1:
            before.append(keras.ops.convert_to_numpy(kernel).copy())
        print(f"begin {batch}", flush=True)


try:
    fit_interruptibly(model, batches, epochs=1, verbose=0, callbacks=[Markers()])
    print("finished", flush=True)
except KeyboardInterrupt:
    applied = not np.array_equal(keras.ops.convert_to_numpy(kernel), before[0])
    print(f"interrupted; step 1 applied: {applied}", flush=True)
"""


class Training:
    """The script in a subprocess, its stdout lines read as they come, each with the time it arrived."""

    def __init__(self, folder: Path, width: int, batch: int, depth: int):
        script = folder / "train_long_steps.py"
        script.write_text(SCRIPT)
        self.stderr = folder / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(self.stderr, "w") as err:
            self.process = subprocess.Popen([sys.executable, str(script), str(width), str(batch), str(depth)],
                                            stdout=subprocess.PIPE, stderr=err, text=True, cwd=folder, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stdout:
            self.lines.put((time.monotonic(), line.strip()))
        self.lines.put((time.monotonic(), None))

    def wait_for(self, prefix: str, timeout: float) -> float:
        """The time the first line starting with prefix arrived; fails after timeout or at the output's end."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.fail(f"no '{prefix}' within {timeout} s")
            if line is None:
                self.fail(f"the script ended without '{prefix}'")
            self.seen.append((at, line))
            if line.startswith(prefix):
                return at

    def press(self):
        self.process.send_signal(signal.SIGINT)
        return time.monotonic()

    def end(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the script was still running {timeout} s later")
        while not self.lines.empty():
            at, line = self.lines.get()
            if line is not None:
                self.seen.append((at, line))
        return code

    def output(self) -> list[str]:
        return [line for _, line in self.seen]

    def fail(self, message: str):
        self.process.kill()
        self.process.wait()
        pytest.fail(f"{message}; stdout so far {self.output()}; stderr: {self.stderr.read_text()[-2000:]}")


def test_a_second_ctrl_c_interrupts_at_once_inside_a_long_native_training_step(tmp_path):
    training = Training(tmp_path, width=4096, batch=8192, depth=2)  # a step of ~1.6 TFLOP: 6-11 s on 2 cores
    training.wait_for("begin 1", timeout=120)  # the traced step's first run on the big batch: native code
    time.sleep(0.5)
    training.press()
    time.sleep(0.3)
    second = training.press()
    interrupted = training.wait_for("interrupted", timeout=60) - second

    # the process then waits for the abandoned step to end (exiting under it crashes TensorFlow): no crash
    assert training.end(timeout=60) == 0, training.stderr.read_text()[-2000:]
    assert interrupted < 3.0, f"KeyboardInterrupt reached the caller {interrupted:.1f} s after the second Ctrl-C"
    # it came during the step, not after it, however fast this machine is
    assert training.output()[-1] == "interrupted; step 1 applied: False"
    assert "begin 2" not in training.output()


def test_one_ctrl_c_stops_at_the_end_of_the_training_step_in_progress(tmp_path):
    training = Training(tmp_path, width=3072, batch=4096, depth=3)  # ~2 s steps
    training.wait_for("begin 1", timeout=120)
    time.sleep(0.3)
    training.press()

    assert training.end(timeout=60) == 0, training.stderr.read_text()[-2000:]
    # the step finished (its update applied), then the KeyboardInterrupt: no further step began
    assert training.output() == ["begin 0", "begin 1", "interrupted; step 1 applied: True"]


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, as in a terminal (a pytest-xdist worker was seen with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def tiny_model():
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    return model


def recorder(error: BaseException | None = None):
    """A callback noting the thread and the Keras precision policy each batch end sees; raises `error` if given."""
    import keras

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.threads, self.policies = [], []

        def on_train_batch_end(self, batch, logs=None):
            self.threads.append(threading.current_thread())
            self.policies.append(keras.config.dtype_policy().name)
            if error is not None:
                raise error

    return Recorder()


def test_a_fit_returns_its_history_and_its_errors_reach_the_caller_as_themselves(python_ctrl_c):
    import keras

    from runners.callbacks import fit_interruptibly

    x, y = np.ones((16, 4), np.float32), np.zeros((16, 2), np.float32)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # a search's setting (reset after each test)
    model, seen = tiny_model(), recorder()
    history = fit_interruptibly(model, x, y, batch_size=8, epochs=2, verbose=0, callbacks=[seen])
    assert isinstance(history, keras.callbacks.History) and len(history.history["loss"]) == 2
    # the fit ran in a worker thread, with the caller's Keras settings (Keras keeps them per thread)
    assert threading.main_thread() not in seen.threads and set(seen.policies) == {"mixed_bfloat16"}

    error = ValueError("from a callback")
    with pytest.raises(ValueError) as raised:
        fit_interruptibly(tiny_model(), x, y, batch_size=8, epochs=1, verbose=0, callbacks=[recorder(error)])
    assert raised.value is error
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after either


def test_outside_the_main_thread_the_fit_runs_in_the_calling_thread(python_ctrl_c):
    from runners.callbacks import fit_interruptibly

    seen, outcome = recorder(), {}

    def run():
        outcome["history"] = fit_interruptibly(tiny_model(), np.ones((8, 4)), np.zeros((8, 2)), epochs=1,
                                               verbose=0, callbacks=[seen])
        outcome["thread"] = threading.current_thread()

    caller = threading.Thread(target=run)
    caller.start()
    caller.join()
    assert outcome["history"].history["loss"] and set(seen.threads) == {outcome["thread"]}
