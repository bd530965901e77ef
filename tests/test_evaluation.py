"""How a trial's test split is read: one view of each photo, or the photo and its mirror image averaged."""
from __future__ import annotations

import keras
import numpy as np

from runners.datasets import load_dataset
from runners.train import evaluate


def test_test_time_flip_averages_each_photo_with_its_left_right_mirror(cifar_dir):
    data = load_dataset("cifar10", data_dir=str(cifar_dir), image_size=32, subset=200)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])  # not mirror-symmetric
    x, y = data.splits["test"]
    photo = model.predict(x.astype(np.float32), verbose=0)
    mirror = model.predict(x[:, :, ::-1].astype(np.float32), verbose=0)

    single, single_probabilities = evaluate(model, data, {"batch_size": 64})
    both, both_probabilities = evaluate(model, data, {"batch_size": 64, "test_time_flip": True})

    np.testing.assert_allclose(single_probabilities, photo, atol=1e-5)
    np.testing.assert_allclose(both_probabilities, (photo + mirror) / 2, atol=1e-5)
    assert "test_accuracy_one_view" not in single
    assert both["test_accuracy_one_view"] == single["test_accuracy"]
    assert both["test_accuracy"] == np.mean(np.argmax(photo + mirror, axis=1) == y)
