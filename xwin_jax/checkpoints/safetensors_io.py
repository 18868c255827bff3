"""Streaming safetensors: read tensors lazily from a memory map, write them one at a time.

The format is an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the raw bytes. We read and write it directly
(rather than through `safetensors.numpy`) for two reasons: bfloat16, which NumPy only knows
through ml_dtypes, and streaming, so converting a 70B checkpoint never holds two copies.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from xwin_jax.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, malformed or does not match; the message names the file."""


class SafetensorsReader:
    """Lazy access to one .safetensors file; `get` returns a read-only view of the mapping."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path}: not a safetensors file "
                                          f"(header length {header_len} is implausible)")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read safetensors header: {err}") from err
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._data = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                  f"{entry['dtype']}")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or end > self._data.shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a corrupt byte range "
                                  f"[{begin}, {end}) for shape {entry['shape']}")
        return self._data[begin:end].view(dtype).reshape(entry["shape"])


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes tensors named in `specs` (name, shape, dtype), asking `produce(name)` for each in
    turn, so only one tensor is materialised at a time. Returns the bytes of tensor data."""
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in specs:
            tensor = np.ascontiguousarray(produce(name), dtype=dtype)
            if tensor.shape != tuple(shape):
                raise CheckpointError(f"{path}: produced tensor {name!r} with shape "
                                      f"{tensor.shape}, planned {tuple(shape)}")
            f.write(tensor.reshape(-1).view(np.uint8))  # no extra copy
    os.replace(tmp, path)
    return offset
