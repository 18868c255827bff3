"""Preference-pair batches (reward models, DPO), deterministic and resumable.

    data = PairsData(["pairs.jsonl"], seq_len=512, batch_size=32)
    batch = next(data.batches(0))   # chosen_/rejected_ tokens, lengths, response masks, ratings

Pairs are read and tokenized once (converters.pairs_batch); each epoch is a seeded
permutation; batch k is a pure function of (files, seed, k), and each host takes its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from xwin_jax.data import converters, formats
from xwin_jax.data.batching import GlobalBatches
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError


@dataclasses.dataclass
class PairsData(GlobalBatches):
    paths: Sequence[str]
    seq_len: int
    batch_size: int
    vocabulary: str = "bytes"
    seed: int = 0
    system: str | None = None
    skip_invalid: bool = False

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.vocab = get_vocabulary(self.vocabulary)
        pairs, self.skipped = [], []
        for path in self.paths:
            result = formats.read_pairs(path, skip_invalid=self.skip_invalid)
            pairs += result.records
            self.skipped += result.skipped
        if len(pairs) < self.batch_size:
            raise ConfigError(f"{list(self.paths)}: {len(pairs)} pairs, fewer than batch_size="
                              f"{self.batch_size}")
        self.arrays = converters.pairs_batch(pairs, self.vocab, self.seq_len, self.system)
        self.num_pairs = len(pairs)

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        return f"{self.num_pairs} preference pairs{skipped}"

    @property
    def batches_per_epoch(self) -> int:
        return self.num_pairs // self.batch_size  # the remainder of each epoch is not used

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
        rows = order[index * self.batch_size:(index + 1) * self.batch_size]
        return {k: v[rows] for k, v in self.arrays.items()}
