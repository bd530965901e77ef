"""`python -m search.bench embedding`: how fast a frozen backbone embeds photos here, per engine and CPU allocator.

The transfer issue's target is EfficientNet-Lite0 at 288 px embedding at least 60 images/s on a 2-core AVX2
CPU and 120 with AVX-512; one AVX2 machine spent a third of its embedding time in the kernel, faulting pages
in TensorFlow's default CPU allocator, and TensorFlow stayed at 45 images/s there with its BFC allocator. The
feature cache now embeds through LiteRT (runners/cpu_forward.py). Rows: TensorFlow with each allocator, and
LiteRT. Each row runs in a fresh process (TensorFlow picks its allocator when it starts), builds the backbone as
the feature cache does (float32, runners.feature_heads.embedder), embeds one batch that traces (or converts),
then times --images random photos: images/s, and the timed part's user and kernel CPU seconds and minor page
faults. Printed with the CPU's kind and its float32 matmul rate.

    python -m search.bench embedding                       # Lite0 at 288 px, 512 photos, every row
    python -m search.bench embedding --backbone efficientnet_lite2 --images 256
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pandas as pd

# row -> (engine, TF_CPU_ALLOCATOR_USE_BFC)
ROWS = {"tensorflow, default allocator": ("tensorflow", "0"), "tensorflow, BFC allocator": ("tensorflow", "1"),
        "LiteRT with XNNPACK (the feature cache's)": ("litert", "1")}


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="python -m search.bench embedding", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone to embed with (default Lite0)")
    p.add_argument("--image-size", type=int, default=288, help="input side (default 288, the transfer space's)")
    p.add_argument("--images", type=int, default=512, help="random photos timed per row (after one traced batch)")
    p.add_argument("--weights", help="weights file, as search.run's --weights")
    p.add_argument("--one", choices=["tensorflow", "litert"], help=argparse.SUPPRESS)  # a row's own process
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """Print the machine, then one row per engine and allocator, each measured in its own process."""
    args = parse(argv)
    if args.one:
        print(json.dumps(embed_once(args)))
        return 0
    from runners.cpu_forward import CPU_BATCH
    from runners.device import cpu_count
    from runners.speed import matmul_gflops
    from search.bench.transfer import cpu_name, has_avx512, has_bf16

    print(f"machine: {cpu_name()}, {cpu_count()} cores, AVX-512 {'yes' if has_avx512() else 'no'}, "
          f"AVX512_BF16 {'yes' if has_bf16() else 'no'}; {matmul_gflops():.0f} GFLOP/s float32 matmul")
    rows = []
    for name, (engine, value) in ROWS.items():
        command = [sys.executable, "-m", "search.bench", "embedding", "--one", engine, "--backbone", args.backbone,
                   "--image-size", str(args.image_size), "--images", str(args.images)]
        command += ["--weights", args.weights] if args.weights else []
        done = subprocess.run(command, env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": value}, capture_output=True,
                              text=True)
        if done.returncode:
            print(f"error: the process of the row {name!r} failed:\n{done.stderr.strip()[-2000:]}", file=sys.stderr)
            return 1
        rows.append({"engine": f"{name} (TF_CPU_ALLOCATOR_USE_BFC={value})",
                     **json.loads(done.stdout.strip().splitlines()[-1])})
    print(f"\n{args.backbone} at {args.image_size} px, {args.images} random photos per row, float32, batches of 64 "
          f"(TensorFlow) and {CPU_BATCH} (LiteRT)")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=("", ".1f", ".2f", ".2f", ".2f", ".0f")))
    return 0


def embed_once(args: argparse.Namespace) -> dict:
    """One row, in this process: build as the feature cache does, trace (or convert) on one batch, time the rest."""
    import numpy as np

    from runners.backbones import backbone_named, resolve_weights
    from runners.feature_heads import embedder, frozen_backbone

    backbone = backbone_named(args.backbone)
    model = frozen_backbone(backbone, args.image_size, resolve_weights(backbone, args.image_size, args.weights))
    embed = embedder(model, backbone, args.image_size, litert=args.one == "litert")
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    embed(images[:64])  # traces the model
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    embed(images)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return {"images/s": args.images / seconds, "seconds": seconds, "user CPU s": after.ru_utime - before.ru_utime,
            "kernel CPU s": after.ru_stime - before.ru_stime, "minor page faults": after.ru_minflt - before.ru_minflt}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
