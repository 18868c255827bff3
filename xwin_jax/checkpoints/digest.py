"""A digest of parameter values: how a cache built from a checkpoint recognises it by content.

Each leaf contributes two position-weighted sums of its bit patterns in wrapping uint32
arithmetic — exact whatever the sharding or the reduction order, and changed by any changed or
moved value (the weights are odd) — and a sha256 over the leaves' names, shapes, dtypes and
sums is the digest. Device arrays are summed where they live (one pass on their devices, 8
bytes per leaf to the host); host arrays (an HF import) are summed on the host in chunks, so
a 70B import never has to fit on one accelerator. Both give the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "uint32-weighted-sums-v1"
_BITS = {8: np.uint32, 4: np.uint32, 2: np.uint16, 1: np.uint8}  # 8-byte values: two words
_FIRST, _SECOND, _MIX = 2654435761, 2246822519, 0x9E3779B9
_HOST_CHUNK = 1 << 24  # elements summed at once on the host


def _device_sums(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)  # the row-major position, mod 2^32
    for axis in range(bits.ndim):
        index = index * jnp.uint32(bits.shape[axis]) + jax.lax.broadcasted_iota(
            jnp.uint32, bits.shape, axis)
    first = index * jnp.uint32(_FIRST) + jnp.uint32(1) | jnp.uint32(1)
    second = (index ^ jnp.uint32(_MIX)) * jnp.uint32(_SECOND) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * first, dtype=jnp.uint32),
                      jnp.sum(bits * second, dtype=jnp.uint32)])


_device_tree_sums = jax.jit(lambda leaves: [_device_sums(x) for x in leaves])


def _host_sums(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x).view(_BITS[x.dtype.itemsize]).reshape(-1)
    sums = np.zeros(2, np.uint64)
    with np.errstate(over="ignore"):  # the wrap-around is the arithmetic
        for start in range(0, bits.size, _HOST_CHUNK):
            chunk = bits[start:start + _HOST_CHUNK].astype(np.uint32)
            index = (np.arange(start, start + chunk.size, dtype=np.uint64)
                     & 0xFFFFFFFF).astype(np.uint32)
            first = index * np.uint32(_FIRST) + np.uint32(1) | np.uint32(1)
            second = (index ^ np.uint32(_MIX)) * np.uint32(_SECOND) | np.uint32(1)
            sums[0] += np.sum(chunk * first, dtype=np.uint64)
            sums[1] += np.sum(chunk * second, dtype=np.uint64)
    return (sums & 0xFFFFFFFF).astype(np.uint32)


def params_digest(params: Any) -> str:
    """The hex digest of a params tree (device or host arrays, or a mix)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    on_device = [i for i, (_, leaf) in enumerate(flat) if isinstance(leaf, jax.Array)]
    device_sums = dict(zip(on_device, jax.device_get(
        _device_tree_sums([flat[i][1] for i in on_device])) if on_device else []))
    digest = hashlib.sha256(ALGORITHM.encode())
    for i, (path, leaf) in enumerate(flat):
        sums = device_sums[i] if i in device_sums else _host_sums(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:"
                      f"{np.dtype(leaf.dtype).name}:".encode())
        digest.update(np.asarray(sums, np.uint32).tobytes())
    return digest.hexdigest()


def checkpoint_digest(directory: str, digest_file: str, params_dir: str) -> str:
    """What identifies a checkpoint's contents: the digest recorded when it was saved; for a
    params checkpoint saved before digests were recorded, a sha256 of its files (read once);
    for an HF directory, its weight files' names, sizes and modification times."""
    path = os.path.join(directory, digest_file)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["params_digest"]
    digest = hashlib.sha256()
    params_path = os.path.join(directory, params_dir)
    if os.path.isdir(params_path):
        for root, _, files in sorted(os.walk(params_path)):
            for name in sorted(files):
                file = os.path.join(root, name)
                digest.update(os.path.relpath(file, params_path).encode())
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
        return digest.hexdigest()
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".bin", ".json")):
            stat = os.stat(os.path.join(directory, name))
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
