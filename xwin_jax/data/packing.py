"""Packing tokenized examples into fixed-length rows for next-token training.

An example of n tokens contributes n - 1 (input, target) positions; rows hold several
examples back to back, told apart by segment ids (1, 2, ...; 0 is padding) with positions
restarting per segment, so attention and rotary see each example alone. Loss weights travel
with their targets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from xwin_jax.errors import ConfigError

FIELDS = ("input_tokens", "target_tokens", "loss_weights", "segment_ids", "positions")


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """examples: (token ids, loss mask) pairs, each at most seq_len + 1 long, in order.
    Greedy: an example goes into the current row if it fits, else starts a new row.
    Returns arrays of shape [rows, seq_len]."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    for ids, mask in examples:
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
        length = len(ids) - 1
        if length < 1:
            continue
        if length > seq_len:
            raise ConfigError(f"an example of {len(ids)} tokens does not fit seq_len + 1 = "
                              f"{seq_len + 1}; truncate it first")
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += length
    out = {name: np.zeros((len(rows), seq_len), np.float32 if name == "loss_weights"
                          else np.int32) for name in FIELDS}
    out["input_tokens"][:] = pad_id
    out["target_tokens"][:] = pad_id
    for r, row in enumerate(rows):
        start = 0
        for segment, (ids, mask) in enumerate(row, start=1):
            n = len(ids) - 1
            span = slice(start, start + n)
            out["input_tokens"][r, span] = ids[:-1]
            out["target_tokens"][r, span] = ids[1:]
            out["loss_weights"][r, span] = mask[1:]
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(n)
            start += n
    return out
