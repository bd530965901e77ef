"""The input pipeline: tf.data from cached uint8 images to augmented, batched, prefetched float batches.

Each epoch's order is a permutation drawn from (seed, epoch) and each batch's augmentation from
(seed, epoch, batch), so an epoch trains on the same batches whether or not the trial was resumed, and
parallel map calls cannot change the result. Images are gathered by index inside the map, which reads
memory-mapped caches without loading the whole set.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from runners.augment import augment_batch, build_recipe
from runners.device import cpu_count

# tf.data's autotuner makes deleting an iterator wait for its optimisation thread, whose sleep grows towards a
# minute; Keras deletes the training and validation iterators every epoch, so epochs stalled for up to 45 s
# with both cores idle (gdb: the main thread in ~RootDataset::Iterator). `search.bench pipeline` measured
# 40.8 s against 28.1 s per epoch with and without it. Fixed settings instead: one map call per core, a few
# batches prefetched.
PARALLEL_CALLS = cpu_count()
PREFETCH_BATCHES = 4


def without_autotune(batches: tf.data.Dataset) -> tf.data.Dataset:
    """The dataset with tf.data's autotuner off, so that finishing an epoch does not wait for it."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.with_options(options)


class EpochOrder:
    """A generator of index batches that draws a new, seeded permutation every time it is iterated."""

    def __init__(self, n: int, batch_size: int, seed: int, first_epoch: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, first_epoch

    def __call__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        epoch, self.epoch = self.epoch, self.epoch + 1
        for b, start in enumerate(range(0, self.n, self.batch_size)):
            yield order[start:start + self.batch_size], np.array([self.seed, epoch, b], dtype=np.int64)


def training_batches(x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int, recipe_steps: list,
                     image_size: int, seed: int, first_epoch: int = 0) -> tf.data.Dataset:
    """Shuffled, augmented training batches of (float32 images 0..255, one-hot labels)."""
    order = EpochOrder(len(y), batch_size, seed, first_epoch)
    spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([3], tf.int64))
    indices = tf.data.Dataset.from_generator(order, output_signature=spec)

    def load(index: np.ndarray, batch_seed: np.ndarray):
        recipe = build_recipe(recipe_steps, image_size, seed=int(np.random.SeedSequence(batch_seed).generate_state(1)[0]))
        index = np.sort(index)  # sorted reads are faster on a memory-mapped cache; order inside a batch is irrelevant
        images = augment_batch(np.asarray(x[index]), recipe).astype(np.float32)
        return images, one_hot(y[index], n_classes)

    batches = indices.map(lambda i, s: as_batch(load, [i, s], image_size, n_classes),
                          num_parallel_calls=PARALLEL_CALLS, deterministic=True)
    steps = -(-len(y) // batch_size)  # a known length lets Keras show and check steps per epoch
    return without_autotune(batches.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(PREFETCH_BATCHES))


def evaluation_batches(x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int,
                       image_size: int) -> tf.data.Dataset:
    """Batches in order, without augmentation, for validation and test."""
    starts = tf.data.Dataset.range(0, len(y), batch_size)

    def load(start: np.int64):
        part = slice(int(start), int(start) + batch_size)
        return np.asarray(x[part], dtype=np.float32), one_hot(y[part], n_classes)

    batches = starts.map(lambda s: as_batch(load, [s], image_size, n_classes),
                         num_parallel_calls=PARALLEL_CALLS, deterministic=True)
    return without_autotune(batches.prefetch(PREFETCH_BATCHES))


def as_batch(load, args, image_size: int, n_classes: int):
    """Run a numpy loader inside the graph and give its outputs static shapes Keras can build on."""
    images, labels = tf.numpy_function(load, args, [tf.float32, tf.float32])
    images.set_shape([None, image_size, image_size, 3])
    labels.set_shape([None, n_classes])
    return images, labels


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Float one-hot rows: every loss in the spaces (cross-entropy with smoothing, MSE) takes them."""
    return np.eye(n_classes, dtype=np.float32)[labels]
