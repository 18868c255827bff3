"""What determines a job's result, as a JSON tree: its settings and the identity of its inputs.

    settings = {"learning_rate": 2e-5, "data": train_data, "init": checkpoint}
    tree = describe(settings)          # JSON: numbers, strings, lists, dicts
    changes(before, tree)              # ["learning_rate: 2e-05 → 0.001", ...]

`describe` turns dataclasses into their fields (minus a class's FINGERPRINT_EXCLUDE), and any
object with a `fingerprint()` method (data sets, vocabularies, checkpoints, judges) into what
that returns. Files are identified by size and content digest, never by path or mtime, so a
moved file is the same input and a file rewritten in place is not. Anything else is a
TypeError: a setting nobody decided about is a bug, not something to skip silently.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

_CHUNK = 1 << 22


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str) -> dict[str, Any]:
    """{"size", "sha256"} of a file's contents (cached per size and mtime in this process)."""
    stat = os.stat(path)
    return {"size": stat.st_size, "sha256": _file_sha256(os.path.abspath(path), stat.st_size,
                                                         stat.st_mtime_ns)}


def describe(value: Any) -> Any:
    """`value` as a JSON-able tree (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value else "nan"
    if hasattr(value, "fingerprint") and callable(value.fingerprint):
        return describe(value.fingerprint())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        excluded = getattr(type(value), "FINGERPRINT_EXCLUDE", ())
        return {"type": type(value).__name__,
                **{f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.name not in excluded and f.compare}}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # NumPy / JAX scalars
        return describe(value.item())
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: give it a fingerprint() "
                    f"method or leave it out of the settings on purpose")


def digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}; lists index as a.0, a.1."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix or "(value)": tree}
    flat: dict[str, Any] = {}
    for key, child in items:
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:
        flat[prefix] = tree
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def changes(before: Any, after: Any, limit: int = 8) -> list[str]:
    """The settings that differ, one "name: before → after" each (the first `limit`)."""
    old, new = flatten(before), flatten(after)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            lines.append(f"{key}: {_short(old.get(key, '<unset>'))} → "
                         f"{_short(new.get(key, '<unset>'))}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines
