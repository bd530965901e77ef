"""Precise batch norm: before each validation a trial's batch-norm layers get the mean of their batch statistics
over a sample of training images, from the current weights, not the moving averages of earlier ones."""
from __future__ import annotations

import numpy as np


def normed_model(momentum: float = 0.9):
    """Four inputs, batch norm, a dense layer: small enough to check the statistics by hand."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization(momentum=momentum)
    model = keras.Model(inputs, keras.layers.Dense(2)(norm(inputs)))
    return model, norm


def test_recalibration_averages_the_batch_statistics_and_keeps_the_momentum():
    from runners.callbacks import recalibrate_batch_norm

    model, norm = normed_model()
    norm.moving_mean.assign(np.full(4, 100.0, np.float32))
    images = np.random.default_rng(0).normal(3.0, 2.0, (48, 4)).astype(np.float32)
    recalibrate_batch_norm(model, images, batch_size=16)
    batches = images.reshape(3, 16, 4)
    np.testing.assert_allclose(np.asarray(norm.moving_mean), batches.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.moving_variance), batches.var(axis=1).mean(axis=0), rtol=1e-4)
    assert norm.momentum == 0.9
    model.layers[-1].trainable = False  # frozen layers (a backbone's) keep their statistics
    norm.trainable = False
    recalibrate_batch_norm(model, images + 50, batch_size=16)
    np.testing.assert_allclose(np.asarray(norm.moving_mean), batches.mean(axis=1).mean(axis=0), rtol=1e-5)


def test_fit_validates_on_statistics_re_estimated_from_an_evenly_spread_sample():
    """Training batches centred on 0; the images given to the callback sorted as a photo folder's are (the first half
    centred on 0, the second on 5): before validation the moving mean is that of a sample spread over both halves
    (~2.5), neither the training batches' moving average (~0) nor the first images' (~0)."""
    import keras

    from runners.callbacks import PreciseBatchNorm

    model, norm = normed_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.0, 1.0, (64, 4)).astype(np.float32), np.zeros((64, 2), np.float32)
    images = np.concatenate([rng.normal(0.0, 1.0, (64, 4)), rng.normal(5.0, 1.0, (64, 4))]).astype(np.float32)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
              callbacks=[PreciseBatchNorm(images, batch_size=16, sample=32)])
    sample = images[np.linspace(0, 127, 32).astype(int)]
    np.testing.assert_allclose(np.asarray(norm.moving_mean), sample.reshape(2, 16, 4).mean(axis=1).mean(axis=0),
                               rtol=1e-5)
    assert 2.0 < float(np.mean(norm.moving_mean)) < 3.0
