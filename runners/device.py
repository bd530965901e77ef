"""Where trials run: GPU detection, memory growth and mixed precision; the CPU path is the tested one.

On a GPU machine each worker is given one card by `search/local_workers.sh` (CUDA_VISIBLE_DEVICES), memory
growth lets several processes share a card, and mixed precision (float16) is on by default where the card has
tensor cores (compute capability 7.0 or newer). On a CPU that multiplies bfloat16 natively (AVX512_BF16 or
AMX) mixed precision is bfloat16 by default: fast_cifar trained 2.3x faster that way on an AMD EPYC (571
against 250 images/s); CPUs without those instructions would emulate it, slower, and stay float32.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import tensorflow as tf

BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def cpu_count() -> int:
    """Cores this process may use (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has bfloat16 matrix instructions (Linux's /proc/cpuinfo flags; False elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(BF16_FLAGS.search(cpuinfo))


def configure_devices(mixed_precision: bool | None = None) -> dict:
    """Set up the visible GPUs (if any) and the precision policy; return a description of the device for logging.

    The policy is set either way (float32 when mixed precision is off), so one run never inherits another's."""
    import keras

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        use_mixed = cpu_has_bf16() if mixed_precision is None else mixed_precision
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if use_mixed else "float32")
        return {"device": "CPU", "gpus": 0, "mixed_precision": "bfloat16" if use_mixed else False}
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability") or (0, 0)
    use_mixed = capability >= (7, 0) if mixed_precision is None else mixed_precision
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    name = details.get("device_name", "GPU")
    return {"device": f"GPU:0 ({name})", "gpus": len(gpus), "mixed_precision": "float16" if use_mixed else False}


@contextlib.contextmanager
def float32_models():
    """On a CPU, models built inside the block compute in float32, whatever the global policy (restored after);
    on a GPU the policy stays (float16 inference is fast there).

    For inference through a frozen backbone on a CPU: EfficientNet-Lite0 at 288 px embedded 126 images/s in
    float32 against 96 in bfloat16 on an AMD EPYC with AVX512_BF16 (512 images, two runs each), Lite2 92
    against 70-73 in the transfer command: depthwise convolutions and casts gain nothing from bfloat16, which
    pays off only in large matrix products."""
    import keras

    if tf.config.list_physical_devices("GPU"):
        yield
        return
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
