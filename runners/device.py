"""Where trials run: GPU detection, memory growth and mixed precision; the CPU path is the tested one.

On a GPU machine each worker is given one card by `runners/local_workers.sh` (CUDA_VISIBLE_DEVICES), memory
growth lets several processes share a card, and mixed precision is on by default where the card has
tensor cores (compute capability 7.0 or newer).
"""
from __future__ import annotations

import tensorflow as tf


def configure_devices(mixed_precision: bool | None = None) -> dict:
    """Set up the visible GPUs (if any) and return a description of the device for logging."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"device": "CPU", "gpus": 0, "mixed_precision": False}
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability") or (0, 0)
    use_mixed = capability >= (7, 0) if mixed_precision is None else mixed_precision
    if use_mixed:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    name = details.get("device_name", "GPU")
    return {"device": f"GPU:0 ({name})", "gpus": len(gpus), "mixed_precision": bool(use_mixed)}
