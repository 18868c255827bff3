"""Packed SFT batches from conversation files, deterministic and resumable.

    data = SftData(["sharegpt.jsonl"], seq_len=2048, batch_size=64, vocabulary="bytes")
    for batch in data.batches(start_step):   # process-local rows of the global batch
        ...

Conversations are read (formats.py), tokenized with the Xwin template (template.py) once,
then each epoch is a seeded permutation of the examples packed into rows. Batch k of the run is
a pure function of (files, seed, k), so `batches(start_step)` resumes exactly where a killed run
stopped; each host takes its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from xwin_jax.data import formats, packing, template
from xwin_jax.data.batching import GlobalBatches
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError


@dataclasses.dataclass
class SftData(GlobalBatches):
    paths: Sequence[str]
    seq_len: int
    batch_size: int
    vocabulary: str = "bytes"  # or the path of a SentencePiece tokenizer.model
    seed: int = 0
    system: str | None = None
    truncation: str = "drop_turns"
    skip_invalid: bool = False

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.vocab = get_vocabulary(self.vocabulary)
        self.stats = template.TruncationStats()
        self.examples = []
        self.skipped = []
        for path in self.paths:
            result = formats.read_sft(path, skip_invalid=self.skip_invalid)
            self.skipped += result.skipped
            for conversation in result:
                tokenized = template.tokenize_conversation(
                    conversation, self.vocab, self.seq_len + 1, self.system, self.truncation)
                self.stats.add(tokenized)
                if tokenized is not None:
                    self.examples.append((tokenized.ids, tokenized.loss_mask))
        if not self.examples:
            raise ConfigError(f"{list(self.paths)}: no usable SFT examples ({self.stats.report()};"
                              f" is seq_len={self.seq_len} shorter than the chat template?)")
        self._epochs: dict[int, dict[str, np.ndarray]] = {}
        self._batch_counts: dict[int, int] = {}

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        return f"{len(self.examples)} SFT examples ({self.stats.report()}{skipped})"

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """All packed rows of one epoch (cached: the last two epochs)."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._epochs[epoch] = packing.pack_examples([self.examples[i] for i in order],
                                                        self.seq_len, self.vocab.pad_id)
            for old in [e for e in self._epochs if e < epoch - 1]:
                del self._epochs[old]
        return self._epochs[epoch]

    def epoch_batches(self, epoch: int) -> int:
        """Whole batches in an epoch (each epoch packs differently; its remainder is unused)."""
        if epoch not in self._batch_counts:
            self._batch_counts[epoch] = len(self.epoch_rows(epoch)["input_tokens"]) // \
                self.batch_size
            if self._batch_counts[epoch] == 0:
                raise ConfigError(f"an epoch packs into fewer rows than batch_size="
                                  f"{self.batch_size}")
        return self._batch_counts[epoch]

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = 0, step
        while index >= self.epoch_batches(epoch):
            index -= self.epoch_batches(epoch)
            epoch += 1
        rows = self.epoch_rows(epoch)
        span = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return {k: v[span] for k, v in rows.items()}
