"""The CNN trained from scratch: conv blocks (strides, pooling, batch norm, skips), then a dense head with dropout.

A trial's architecture is either `generated` from a few numbers (block b has `filters * width * 2**b`
filters and `convs_per_block` convolutions, the first of which uses `strides`; every block ends in pooling)
or one of the space's named `architectures`, which spell out every block (filters, kernel, strides, convs,
pooling) and the head, as the seed studies' hand-made models need. Both become the same list of blocks, so
one builder makes every model. The head flattens (as the seed studies did) or pools globally, then dense
layers, each followed by dropout.
"""
from __future__ import annotations

import keras
from keras import layers

from runners import train
from runners.protocol import ArchitectureError, RunnerConfigError


def layout(params: dict, architectures: dict | None = None) -> dict:
    """The blocks and head of a trial's model: its named architecture resolved, or one generated from params."""
    width = params.get("width", 1.0)
    name = params.get("architecture", "generated")
    if name != "generated":
        if not architectures or name not in architectures:
            raise ArchitectureError(f"architecture '{name}' is not defined under the space's 'architectures'")
        spec = architectures[name]
        blocks = [{"filters": max(1, round(b["filters"] * width)), "kernel": b.get("kernel", 3),
                   "convs": b.get("convs", 1), "strides": b.get("strides", 1),
                   "pool": params.get("pooling", "max") if b.get("pool", "param") == "param" else b["pool"]}
                  for b in spec["blocks"]]
        dense = spec.get("dense", "param")
        return {"blocks": blocks,
                "head": params.get("head", "flatten") if spec.get("head", "param") == "param" else spec["head"],
                "dense": [params["dense_units"]] * params.get("dense_layers", 0) if dense == "param" else dense,
                "dropout": spec.get("dropout", "each"),
                "batch_norm": param_or(spec, params, "batch_norm", True),
                "residual": param_or(spec, params, "residual", False)}
    convs = params.get("convs_per_block", 1)
    blocks = [{"filters": max(1, round(params["filters"] * width * 2 ** b)), "kernel": params["kernel_size"],
               "convs": convs, "strides": [params["strides"]] + [1] * (convs - 1), "pool": params["pooling"]}
              for b in range(params["conv_blocks"])]
    return {"blocks": blocks, "head": params.get("head", "flatten"),
            "dense": [params.get("dense_units")] * params.get("dense_layers", 0), "dropout": "each",
            "batch_norm": params.get("batch_norm", True), "residual": params.get("residual", False)}


def param_or(spec: dict, params: dict, key: str, default):
    """An architecture's own setting, or the trial's parameter where it says `param`."""
    value = spec.get(key, "param")
    return params.get(key, default) if value == "param" else value


def conv_strides(block: dict) -> list[int]:
    """The stride of each convolution of a block (a single number applies to every one)."""
    strides = block["strides"]
    return list(strides) if isinstance(strides, list) else [strides] * block["convs"]


def feature_map_sizes(params: dict, image_size: int, architectures: dict | None = None) -> list[int]:
    """The side of the feature map after each block; raises ArchitectureError when it drops below 1."""
    side, sizes = image_size, []
    for index, block in enumerate(layout(params, architectures)["blocks"]):
        for stride in conv_strides(block):
            side = -(-side // stride)  # 'same' padding rounds up
        if block["pool"] != "none":
            side = side // 2           # pooling 2x2, 'valid'
        if side < 1:
            raise ArchitectureError(
                f"the architecture shrinks a {image_size}px input below 1x1 at block {index + 1} "
                "(fewer blocks, stride 1 or a larger --image-size)")
        sizes.append(side)
    return sizes


def build_model(params: dict, image_size: int, n_classes: int, architectures: dict | None = None) -> keras.Model:
    """A Keras CNN for (image_size, image_size, 3) inputs in 0..255, ending in a softmax over n_classes."""
    feature_map_sizes(params, image_size, architectures)
    spec = layout(params, architectures)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0)(inputs)
    for block in spec["blocks"]:
        x = conv_block(x, block, spec["batch_norm"], spec["residual"])
    x = layers.Flatten()(x) if spec["head"] == "flatten" else layers.GlobalAveragePooling2D()(x)
    head = {**params, "dense_layers": len(spec["dense"])}
    return keras.Model(inputs, train.classifier_head(x, head, n_classes, units=spec["dense"],
                                                                 dropout=spec["dropout"]), name="scratch_cnn")


def conv_block(x, block: dict, batch_norm: bool, residual: bool):
    """Convolutions (+ batch norm) + ReLU, an optional skip around them, then 2x2 pooling."""
    shortcut = x
    strides = conv_strides(block)
    for index, stride in enumerate(strides):
        x = layers.Conv2D(block["filters"], block["kernel"], strides=stride, padding="same", use_bias=not batch_norm)(x)
        if batch_norm:
            # momentum 0.9, not Keras's 0.99: short CPU trials (~50 steps an epoch) otherwise validate
            # with moving statistics that are still mostly their initial values (val accuracy near chance)
            x = layers.BatchNormalization(momentum=0.9)(x)
        if not (residual and index == len(strides) - 1):
            x = layers.ReLU()(x)
    if residual:
        stride = 1
        for s in strides:
            stride *= s
        if stride != 1 or shortcut.shape[-1] != block["filters"]:
            # a 1x1 projection where the skip changes size or width, as in ResNet
            shortcut = layers.Conv2D(block["filters"], 1, strides=stride, padding="same", use_bias=not batch_norm)(shortcut)
            if batch_norm:
                shortcut = layers.BatchNormalization(momentum=0.9)(shortcut)
        x = layers.ReLU()(layers.Add()([x, shortcut]))
    if block["pool"] == "max":
        return layers.MaxPooling2D(2)(x)
    if block["pool"] == "average":
        return layers.AveragePooling2D(2)(x)
    return x


def train_and_evaluate(params: dict, data, **kwargs) -> train.TrialResult:
    """Train and evaluate this model on data (see runners.train.train_and_evaluate for the arguments).

    `options["max_mflops"]` (the space's budget) rejects, before training, a model whose forward pass costs
    more MFLOP per image: it keeps every epoch of the space within minutes on a CPU."""
    options = kwargs.get("options") or {}
    architectures, limit = options.get("architectures"), options.get("max_mflops")

    def build(p, image_size, n_classes):
        model = build_model(p, image_size, n_classes, architectures)
        mflops = train.forward_flops(model) / 1e6
        if limit and mflops > limit:
            raise ArchitectureError(f"{mflops:,.0f} MFLOP per image at {image_size}px, over the space's "
                                    f"budget.max_mflops ({limit:,.0f})")
        return model

    return train.train_and_evaluate(params, data, build, **kwargs)


def narrow_choices(choices: dict[str, list], defaults: dict, *, backbone: str | None,
                   weights: str | None) -> dict[str, tuple[list, object]]:
    """A CNN from scratch has no backbone: --backbone and --weights are mistakes here."""
    if backbone or weights:
        raise RunnerConfigError("--backbone and --weights apply to the transfer space; this space trains a CNN "
                                "from scratch and has no backbone")
    return {}


def forward_mflops(params: dict, data, *, options: dict | None = None) -> float:
    """MFLOP of one image's forward pass through this configuration's model (built, not trained)."""
    model = build_model(params, data.image_size, len(data.class_names), (options or {}).get("architectures"))
    return train.forward_flops(model) / 1e6


def measure_speed(params: dict, data, *, options: dict | None = None) -> dict:
    """A few timed training steps of this configuration at its batch size (runners.speed)."""
    from runners.speed import training_speed

    model = build_model(params, data.image_size, len(data.class_names), (options or {}).get("architectures"))
    model.compile(optimizer=train.make_optimizer(params, 1, 1), loss=train.make_loss(params))
    return training_speed(model, params["batch_size"], data.image_size, len(data.class_names))


def evaluate_saved(path, params: dict, data, *, options: dict | None = None) -> tuple[dict, object, object]:
    """A saved model's test metrics and its answers on test and validation (runners.train.evaluate): a trial that
    trained without answering the test split (a screen), tested after all."""
    model = keras.models.load_model(path, compile=False)
    metrics, test_probabilities = train.evaluate(model, data, params)
    return metrics, test_probabilities, train.val_probabilities(model, data, params)


release = train.release  # the Runner protocol's last call
