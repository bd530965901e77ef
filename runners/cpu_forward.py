"""A frozen model's forward pass on a CPU through LiteRT and its XNNPACK kernels, which TensorFlow's CPU kernels trail.

EfficientNet-Lite0 at 288 px (average- and max-pooled features, 256 random images, one run each) on a 2-core AMD
EPYC with AVX2 only, 188 GFLOP/s float32 matmul: TensorFlow 44.6 images/s with its BFC allocator (25.8 with its
default one, a third of the time in the kernel), LiteRT with XNNPACK 96-109 at batches of 1 to 16, the features
equal to 3e-5. Through the feature cache's embedder (its input pipeline beside it), batches of 4 to 16 images ran
at 89-96 images/s, 32 at 87 and 64 at 75: small batches keep XNNPACK's work in the caches. The model is converted
once (about 9 s for Lite0) with a fixed batch; on a GPU TensorFlow runs it.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from runners.console import filtered_stderr, logger_level
from runners.device import cpu_count

CPU_BATCH = 8  # images per LiteRT call (see above)
CONVERSION_PAYS_AT = 1000  # images at 288 px (work grows with the pixels) from which converting pays: Lite0's
                           # conversion takes about 9 s on AVX2, and each image then costs 11 ms less (45 against 93
                           # images/s); a test's few dozen photos at 64 px embed in TensorFlow in a second

# (caller's key, batch) -> a LiteRT forward pass (None on a GPU), converted once per process: a conversion takes
# seconds, and studies and tests embed one shared frozen backbone (feature_heads.frozen_backbone) again and again
CONVERSIONS: dict[tuple, Callable | None] = {}


def forward_in_batches(model, batch_size: int, images: int, image_size: int, *, litert: bool | None = None,
                       key=None) -> tuple[Callable, int]:
    """(forward, batch): model's forward pass, a batch of images -> its outputs as arrays, and the batch size to
    call it with, for `images` images of `image_size` pixels. On a CPU LiteRT's (batches of at most CPU_BATCH; the
    conversion kept for the process under `key` when one is given) where `litert` says so, or, when it is None,
    where a conversion is kept or one pays for these images (conversion_pays); else TensorFlow's."""
    batch = min(batch_size, CPU_BATCH)
    if litert is None:
        litert = (key, batch) in CONVERSIONS or conversion_pays(images, image_size)
    if litert:
        if key is None:
            forward = cpu_forward(model, batch)
        else:
            if (key, batch) not in CONVERSIONS:
                CONVERSIONS[(key, batch)] = cpu_forward(model, batch)
            forward = CONVERSIONS[(key, batch)]
        if forward is not None:
            return forward, batch
    return (lambda x: [np.asarray(y) for y in keras.tree.flatten(model.predict_on_batch(x))]), batch_size


def conversion_pays(images: int, image_size: int) -> bool:
    """Whether LiteRT's conversion of a backbone costs less than it saves over TensorFlow for these images."""
    return images * (image_size / 288) ** 2 >= CONVERSION_PAYS_AT


def cpu_forward(model, batch_size: int) -> Callable[[np.ndarray], list[np.ndarray]] | None:
    """model's forward pass, float32 images -> its outputs as arrays, through a LiteRT interpreter on this CPU;
    None where TensorFlow should run it (a GPU is visible, or the ai-edge-litert package is not installed)."""
    if tf.config.list_physical_devices("GPU"):
        return None
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    widths = [int(output.shape[-1]) for output in model.outputs]
    if len(widths) > 1:  # one output tensor, so the interpreter's output order cannot mix the model's outputs up
        model = keras.Model(model.inputs, keras.layers.Concatenate()(model.outputs))
    # Keras's export prints every captured tensor and TensorFlow logs where it wrote the model: not for the console
    # (a converted tf.function of the model, from_concrete_functions, computed NaN everywhere)
    with contextlib.redirect_stdout(io.StringIO()), logger_level("tensorflow", logging.WARNING):
        converted = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    with filtered_stderr(("XNNPACK delegate",)):  # LiteRT's own line announcing it
        interpreter = Interpreter(model_content=converted, num_threads=cpu_count())
        source = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(source, [batch_size, *model.inputs[0].shape[1:]])
        interpreter.allocate_tensors()
    target = interpreter.get_output_details()[0]["index"]
    splits = np.cumsum(widths)[:-1]

    def forward(images) -> list[np.ndarray]:
        x = np.asarray(images, dtype=np.float32)
        n = len(x)
        if n < batch_size:  # the last batch, padded to the converted shape
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return np.split(interpreter.get_tensor(target)[:n], splits, axis=-1)

    return forward
