"""Preference-pair batches (reward models, DPO), deterministic and resumable.

    data = PairsData(["pairs.jsonl"], seq_len=512, batch_size=32)
    batch = next(data.batches(0))   # chosen_/rejected_ tokens, lengths, response masks, ratings

Pairs are read at construction (a malformed file fails at once, naming file:line) and
tokenized once (converters.pairs_batch) when a vocabulary is bound: at construction when
`vocabulary` is given, else when the job binds its checkpoint's (`data.with_vocabulary(vocab)`,
batching.LazyVocabulary). Each epoch is a seeded permutation; batch k is a pure function of
(files, vocabulary, seed, k), and each host takes its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from xwin_jax.data import converters, formats
from xwin_jax.data.batching import GlobalBatches, LazyVocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.fingerprint import file_identity


@dataclasses.dataclass
class PairsData(LazyVocabulary, GlobalBatches):
    paths: Sequence[str]
    seq_len: int
    batch_size: int
    # A Vocabulary, 'bytes' or a tokenizer path; None: tokenized once the job binds one.
    vocabulary: Any = None
    seed: int = 0
    system: str | None = None
    skip_invalid: bool = False

    BOUND = ("arrays",)

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.pairs: list[formats.PreferencePair] = []
        self.skipped = []
        self.file_identities = []  # of what was read: a file rewritten later is not this data
        for path in self.paths:
            result = formats.read_pairs(path, skip_invalid=self.skip_invalid)
            self.file_identities.append(file_identity(path))
            self.pairs += result.records
            self.skipped += result.skipped
        if len(self.pairs) < self.batch_size:
            raise ConfigError(f"{list(self.paths)}: {len(self.pairs)} pairs, fewer than "
                              f"batch_size={self.batch_size}")
        self.num_pairs = len(self.pairs)
        self._bind_given()

    def _tokenize(self, vocab) -> None:
        self.arrays = converters.pairs_batch(self.pairs, vocab, self.seq_len, self.system)

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        unbound = "" if self.has_vocabulary else " (no vocabulary yet)"
        return f"{self.num_pairs} preference pairs{skipped}{unbound}"

    @property
    def batches_per_epoch(self) -> int:
        return self.num_pairs // self.batch_size  # the remainder of each epoch is not used

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
        rows = order[index * self.batch_size:(index + 1) * self.batch_size]
        return {k: v[rows] for k, v in self.arrays.items()}
