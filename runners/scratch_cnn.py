"""The CNN trained from scratch: conv blocks (strides, pooling, batch norm), then a dense head with dropout.

Block b has `filters * 2**b` filters and `convs_per_block` convolutions; the first convolution of a block
uses `strides`, and every block ends in max or average pooling. The head flattens (as the seed studies did)
or pools globally, then `dense_layers` dense layers of `dense_units`, each followed by dropout.
"""
from __future__ import annotations

import keras
from keras import layers

from runners import train
from runners.train import ArchitectureError


def feature_map_sizes(params: dict, image_size: int) -> list[int]:
    """The side of the feature map after each block; raises ArchitectureError when it drops below 1."""
    side, sizes = image_size, []
    for block in range(params["conv_blocks"]):
        side = -(-side // params["strides"])  # 'same' padding rounds up
        side = side // 2                       # pooling 2x2, 'valid'
        if side < 1:
            raise ArchitectureError(
                f"{params['conv_blocks']} blocks with strides {params['strides']} and 2x2 pooling shrink a "
                f"{image_size}px input below 1x1 at block {block + 1}")
        sizes.append(side)
    return sizes


def build_model(params: dict, image_size: int, n_classes: int) -> keras.Model:
    """A Keras CNN for (image_size, image_size, 3) inputs in 0..255, ending in a softmax over n_classes."""
    feature_map_sizes(params, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0)(inputs)
    pool = layers.MaxPooling2D if params["pooling"] == "max" else layers.AveragePooling2D
    for block in range(params["conv_blocks"]):
        filters = params["filters"] * 2 ** block
        for conv in range(params.get("convs_per_block", 1)):
            x = layers.Conv2D(filters, params["kernel_size"], strides=params["strides"] if conv == 0 else 1,
                              padding="same", use_bias=not params["batch_norm"])(x)
            if params["batch_norm"]:
                # momentum 0.9, not Keras's 0.99: short CPU trials (~50 steps an epoch) otherwise validate
                # with moving statistics that are still mostly their initial values (val accuracy near chance)
                x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
        x = pool(2)(x)
    x = layers.Flatten()(x) if params.get("head", "flatten") == "flatten" else layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, train.classifier_head(x, params, n_classes), name="scratch_cnn")


def train_and_evaluate(params: dict, data, **kwargs) -> train.TrialResult:
    """Train and evaluate this model on data (see runners.train.train_and_evaluate for the arguments)."""
    return train.train_and_evaluate(params, data, build_model, **kwargs)
