"""How fast this machine trains: the measurements a search plans its trials from.

`matmul_gflops` is the machine's float32 matrix-multiply rate (what every benchmark prints first);
`training_speed` times a few real training steps of a compiled model on one batch of random images, in the
precision policy in force (bfloat16 where the CPU multiplies it natively), after one step that traces it.
"""
from __future__ import annotations

import time

import numpy as np


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply rate (GFLOP/s), best of a few runs."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def training_speed(model, batch_size: int, image_size: int, n_classes: int, steps: int = 3) -> dict:
    """Images per second, training GFLOP/s (3 x the forward FLOPs per image) and the seconds the first step
    took to trace, of a compiled model, from `steps` timed steps after that one."""
    from runners.train import forward_flops

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, image_size, image_size, 3)).astype("float32")
    y = np.eye(n_classes, dtype="float32")[rng.integers(0, n_classes, batch_size)]
    started = time.perf_counter()
    model.train_on_batch(x, y)  # traces the step: paid once per trial, not per epoch
    trace_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    seconds = (time.perf_counter() - started) / steps
    mflops = forward_flops(model) / 1e6
    images_per_second = batch_size / seconds
    return {"images_per_second": images_per_second, "mflops_per_image": mflops,
            "train_gflops": 3 * mflops * images_per_second / 1e3, "trace_seconds": trace_seconds}


def embedding_speed(backbone, image_size: int, batch_size: int = 64, batches: int = 2) -> dict:
    """Images per second of a backbone's forward pass over `batches` timed batches after one that traces."""
    from runners.train import forward_flops

    x = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3)).astype("float32")
    started = time.perf_counter()
    backbone.predict_on_batch(x)
    trace_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        backbone.predict_on_batch(x)
    images_per_second = batch_size * batches / (time.perf_counter() - started)
    mflops = forward_flops(backbone) / 1e6
    return {"images_per_second": images_per_second, "mflops_per_image": mflops,
            "train_gflops": mflops * images_per_second / 1e3, "trace_seconds": trace_seconds}
