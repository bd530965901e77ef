"""`python -m search.bench pipeline`: does the input pipeline keep up with training, and what does a dogs trial hold in memory?

For CIFAR-10 at 32 px and the dogs at 128 and 224 px, with no augmentation and with each shipped recipe:
images/s the tf.data pipeline delivers on its own, images/s the space's default scratch CNN consumes in
training, and their ratio (target >= 2: augmentation never starves the model). Then seconds per epoch of a
real Keras fit with the pipeline as shipped (tf.data's autotuner off) and with the autotuner on, whose
iterators made epochs wait for its thread. Then the peak resident memory of one real dogs trial on every
image of the data at 128 px (target < 3 GiB), scaled to 20,580.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

FULL_DOGS = 20_580


def pipeline_rate(data, recipe: list, batch: int, seconds: float = 6.0) -> float:
    """Images/s delivered by training_batches alone (no model)."""
    from runners.pipeline import training_batches

    x, y = data.splits["train"]
    batches = training_batches(x, y, len(data.class_names), batch, recipe, data.image_size, seed=0).repeat()
    images, started = 0, None
    for i, (b, _) in enumerate(batches):
        if i == 2:  # skip the warm-up batches
            started, images = time.perf_counter(), 0
        images += len(b)
        if started and time.perf_counter() - started > seconds:
            break
    return images / (time.perf_counter() - started)


def training_rate(data, params: dict, architectures: dict, steps: int = 12) -> float:
    """Images/s the default model trains at on batches already in memory (the consumer's rate)."""
    import keras
    import numpy as np

    from runners.scratch_cnn import build_model
    from runners.train import make_loss, make_optimizer

    batch = params["batch_size"]
    x = np.asarray(data.splits["train"][0][: batch * 4], dtype=np.float32)
    y = np.eye(len(data.class_names), dtype=np.float32)[data.splits["train"][1][: batch * 4]]
    model = build_model(params, data.image_size, len(data.class_names), architectures)
    model.compile(optimizer=make_optimizer(params, 10, 1), loss=make_loss(params))
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # graph tracing happens here, untimed
    started = time.perf_counter()
    for _ in range(steps // 4):
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    rate = (steps // 4) * len(x) / (time.perf_counter() - started)
    keras.backend.clear_session()
    return rate


def epoch_seconds(data, params: dict, space, epochs: int, autotune: bool) -> list[float]:
    """Wall seconds of each epoch of a real fit (training and validation) of the default model."""
    import keras
    import tensorflow as tf

    from runners.pipeline import evaluation_batches, training_batches
    from runners.scratch_cnn import build_model
    from runners.train import make_loss, make_optimizer

    options = tf.data.Options()
    options.autotune.enabled = autotune  # the later setting wins over the pipeline's own
    (x, y), (x_val, y_val), n = data.splits["train"], data.splits["val"], len(data.class_names)
    batch = params["batch_size"]
    recipe = space.recipes[params["augmentation"]]
    train = training_batches(x, y, n, batch, recipe, data.image_size, seed=0).with_options(options)
    val = evaluation_batches(x_val, y_val, n, batch, data.image_size).with_options(options)
    model = build_model(params, data.image_size, n, space.architectures)
    model.compile(optimizer=make_optimizer(params, len(train), epochs), loss=make_loss(params))
    ends = [time.perf_counter()]
    clock = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
    model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=[clock], shuffle=False)
    keras.backend.clear_session()
    return [b - a for a, b in zip(ends, ends[1:])][1:]  # the first epoch traces the graphs


def peak_trial_memory(data_dir: str | None, image_size: int) -> float:
    """Peak RSS (GiB) of a one-epoch dogs trial on every image, run as its own process."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "search.run", "--space", "scratch_cnn", "--dataset", "stanford_dogs",
                   "--image-size", str(image_size), "--trials", "1", "--epochs", "1", "--subset", "0",
                   "--workdir", workdir, "--quiet"]  # the first trial of a new study is the space's default
        command += ["--data-dir", data_dir] if data_dir else []
        subprocess.run(command, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    """Print the rate table, the epoch times with and without the autotuner, and the memory figure."""
    p = argparse.ArgumentParser(prog="python -m search.bench pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--cifar-dir", help="CIFAR-10 location")
    p.add_argument("--dogs-dir", help="Stanford Dogs location")
    p.add_argument("--workdir", default="mlruns", help="where the decoded-image cache lives")
    p.add_argument("--subset", type=int, default=2000, help="images per split for the rate measurements")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the fit timed with and without the autotuner")
    p.add_argument("--skip-rates", action="store_true", help="leave out the pipeline and training rate table")
    p.add_argument("--skip-memory", action="store_true", help="leave out the (minutes-long) memory trial")
    args = p.parse_args(argv)

    from runners.datasets import load_dataset
    from runners.device import configure_devices
    from search.bench.overhead import cpu_name, matmul_gflops
    from search.space import default_params, load_space

    device = configure_devices()  # the precision a trial trains in here (bfloat16 where the CPU has it)
    print(f"machine: {cpu_name()}, {matmul_gflops():.0f} GFLOP/s float32 matmul; "
          f"training in {device['mixed_precision'] or 'float32'}\n")
    rated = [] if args.skip_rates else [("cifar10", 32, args.cifar_dir), ("stanford_dogs", 128, args.dogs_dir),
                                         ("stanford_dogs", 224, args.dogs_dir)]
    if rated:
        print(f"{'data':<22} {'recipe':<22} {'pipeline img/s':>15} {'training img/s':>15} {'ratio':>7}")
    for dataset, size, data_dir in rated:
        space = load_space("scratch_cnn", dataset)
        params = {**default_params(space), "image_size": size}
        data = load_dataset(dataset, data_dir=data_dir, image_size=size, subset=args.subset, workdir=args.workdir)
        consumed = training_rate(data, params, space.architectures)
        for recipe, steps in space.recipes.items():
            delivered = pipeline_rate(data, steps, params["batch_size"])
            print(f"{dataset + f' {size}px':<22} {recipe:<22} {delivered:>15,.0f} {consumed:>15,.0f} "
                  f"{delivered / consumed:>7.1f}")
    cifar = load_dataset("cifar10", data_dir=args.cifar_dir, image_size=32, subset=args.subset, workdir=args.workdir)
    space = load_space("scratch_cnn", "cifar10")
    params = default_params(space)
    print(f"\nseconds per epoch of a real fit, cifar10 {cifar.sizes()['train']:,} training images, "
          f"{args.epochs - 1} epochs after the first")
    print(f"{'tf.data autotuner':<28} {'median':>8} {'max':>8} {'total':>8}")
    for label, autotune in (("off (as shipped)", False), ("on (tf.data's default)", True)):
        seconds = sorted(epoch_seconds(cifar, params, space, args.epochs, autotune))
        print(f"{label:<28} {seconds[len(seconds) // 2]:>8.1f} {seconds[-1]:>8.1f} {sum(seconds):>8.1f}")
    if not args.skip_memory:
        peak = peak_trial_memory(args.dogs_dir, 128)
        images = sum(load_dataset("stanford_dogs", data_dir=args.dogs_dir, image_size=128,
                                  workdir=args.workdir).sizes().values())
        cache_gib = images * 128 * 128 * 3 / 2 ** 30
        scaled = peak + cache_gib * (FULL_DOGS / images - 1)
        print(f"\npeak memory of a 1-epoch dogs trial on {images:,} images at 128 px: {peak:.2f} GiB "
              f"(decoded images {cache_gib:.2f} GiB); scaled to {FULL_DOGS:,} images: {scaled:.2f} GiB")
    return 0
