"""The input pipeline: batches of the right shape, and epochs that end without waiting on tf.data's autotuner."""
import numpy as np

from runners.datasets import load_dataset
from runners.pipeline import evaluation_batches, training_batches


def test_training_and_evaluation_batches_have_their_shapes_and_no_autotuner(cifar_dir, workdir):
    # With the autotuner on, deleting an iterator (Keras does it twice per epoch) waited up to a minute for
    # its optimisation thread: `search.bench pipeline` measures the stall; here the setting that avoids it.
    data = load_dataset("cifar10", data_dir=str(cifar_dir), image_size=32, subset=100, workdir=workdir)
    (x_train, y_train), (x_val, y_val) = data.splits["train"], data.splits["val"]
    train = training_batches(x_train, y_train, 10, 32, [{"HorizontalFlip": {"p": 0.5}}], 32, seed=0)
    val = evaluation_batches(x_val, y_val, 10, 64, 32)
    images, labels = next(iter(train))
    assert images.shape == (32, 32, 32, 3) and labels.shape == (32, 10)
    assert np.allclose(labels.numpy().sum(axis=1), 1.0)
    assert sum(len(y) for _, y in val) == len(y_val)
    for batches in (train, val):
        assert batches.options().autotune.enabled is False


def test_the_pipeline_benchmark_times_epochs_with_and_without_the_autotuner(cifar_dir, workdir, capsys):
    from search.bench.pipeline import main

    assert main(["--cifar-dir", str(cifar_dir), "--workdir", str(workdir), "--subset", "200", "--epochs", "2",
                 "--skip-rates", "--skip-memory"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith(("off (as shipped)", "on (tf.data"))]
    assert len(rows) == 2, printed
    assert all(float(row[-1]) > 0 for row in rows)  # total seconds of the timed epochs
