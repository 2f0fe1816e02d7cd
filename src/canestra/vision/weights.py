"""Read a legacy (non-zip) PyTorch ``.pth`` state dict into numpy without torch.

The EfficientNet-Lite0 weights ship as a PyTorch-1.x pickle. Reading them with a
restricted unpickler keeps torch (several GB) out of the runtime install, and the
restricted ``find_class`` refuses anything but tensors and dicts, so a tampered
file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

__all__ = ["load_state_dict"]

_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
}


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        assert self.storage.data is not None
        base = self.storage.data
        if not self.size:
            return base[self.offset : self.offset + 1].reshape(()).copy()
        itemsize = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(fh)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}:
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _DTYPES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, _DTYPES[storage_type], int(numel))
        return self._storages[key]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` from a legacy-format ``torch.save`` file."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as fh:
        if pickle.load(fh) != _MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch weights file")
        pickle.load(fh)  # protocol version
        pickle.load(fh)  # sys info
        obj = _Unpickler(fh, storages).load()
        keys = pickle.load(fh)
        for key in keys:
            st = storages[key]
            (numel,) = struct.unpack("<q", fh.read(8))
            nbytes = numel * np.dtype(st.dtype).itemsize
            st.data = np.frombuffer(fh.read(nbytes), dtype=st.dtype, count=numel)
    return {k: v.materialise() for k, v in obj.items() if isinstance(v, _TensorRef)}
