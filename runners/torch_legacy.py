"""A torch-free reader for PyTorch's legacy (pre-zip) serialisation, the format of the EfficientNet-Lite .pth
files: three small pickles (magic number, protocol, system info), the state dict pickle (tensors as persistent
ids naming storages), the list of storage keys, then each storage as an int64 element count and raw
little-endian data. A restricted unpickler (standard library and numpy only) reads it; tensors honour their
strides (the Lite checkpoints carry TF-layout strides)."""
from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Record a tensor; its storage bytes only follow the pickle in the file."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuild without a storage reference")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, _requires_grad=False, _backward_hooks=None, *_ignored):
    """A Parameter is just its tensor for our purposes."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild helpers, storage types and OrderedDict."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        """Refuse every global outside the allow-list, so no code can run."""
        if module == "torch" and name in _STORAGE_DTYPES:
            # A fresh marker each time: a crafted BUILD opcode cannot alter shared state.
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name!s} from a .pth file "
                "(only torch tensor-rebuild functions, storage types and "
                "collections.OrderedDict are allowed)"
            ) from None

    def persistent_load(self, pid):
        """Turn ('storage', type, key, location, numel[, view]) into a storage reference."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-0.4 .pth files) are not supported")
        typed = isinstance(storage_type, _StorageType) and isinstance(storage_type.dtype, np.dtype)
        if not typed:
            raise pickle.UnpicklingError(f"persistent id without a storage type: {pid!r:.80}")
        ref = _StorageRef(str(key), storage_type.dtype, int(numel))
        if self.storages.setdefault(ref.key, ref) != ref:
            raise pickle.UnpicklingError(f"storage {ref.key} declared twice with different types")
        return ref


def _check_legacy_header(f) -> None:
    """Legacy files start with magic number, protocol version and sys-info pickles."""
    magic = _RestrictedUnpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a legacy PyTorch file (bad magic number)")
    protocol = _RestrictedUnpickler(f).load()
    if protocol != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _RestrictedUnpickler(f).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise pickle.UnpicklingError("only little-endian legacy files are supported")


def _read_storages(f, keys: list, storages: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read each storage as int64 element count then raw little-endian data, in key order."""
    arrays = {}
    for key in map(str, keys):
        ref = storages.get(key)
        if ref is None:
            raise ValueError(f"storage {key} listed in the file but never declared")
        header = f.read(8)
        count = struct.unpack("<q", header)[0] if len(header) == 8 else -1
        if count != ref.numel:
            raise ValueError(f"storage {key}: expected {ref.numel} elements, file has {count}")
        data = f.read(count * ref.dtype.itemsize)
        if len(data) != count * ref.dtype.itemsize:
            raise ValueError(f"storage {key}: file truncated")
        arrays[key] = np.frombuffer(data, dtype=ref.dtype)
    missing = set(storages) - set(arrays)
    if missing:
        raise ValueError(f"storages missing from file: {sorted(missing)[:5]}")
    return arrays


def _tensor_view(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """Strided read-only view; bounds are checked so a crafted file cannot read past its storage."""
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise ValueError("negative size/stride/offset in tensor metadata")
    if len(ref.size) != len(ref.stride):
        raise ValueError("tensor size and stride have different ranks")
    if all(ref.size):
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= storage.size:
            raise ValueError("tensor extends past the end of its storage")
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[ref.offset:],
        shape=ref.size,
        strides=tuple(s * item for s in ref.stride),
        writeable=False,
    )


def read_torch_legacy(path) -> dict[str, np.ndarray]:
    """Read a legacy (pre-zip) PyTorch state-dict file into numpy arrays without torch."""
    with open(path, "rb") as f:
        _check_legacy_header(f)
        unpickler = _RestrictedUnpickler(f)
        state = unpickler.load()
        keys = _RestrictedUnpickler(f).load()
        if not (isinstance(state, dict) and all(isinstance(v, _TensorRef) for v in state.values())):
            raise ValueError(f"{path}: expected a flat state dict of tensors")
        if not isinstance(keys, list):
            raise ValueError(f"{path}: storage key list missing")
        storages = _read_storages(f, keys, unpickler.storages)
    return {name: _tensor_view(t, storages[t.storage.key]) for name, t in state.items()}
