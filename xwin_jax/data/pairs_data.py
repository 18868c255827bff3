"""Preference-pair batches (reward models, DPO), deterministic and resumable.

    data = PairsData(["pairs.jsonl"], seq_len=512, batch_size=32)
    batch = next(data.batches(0))   # chosen_/rejected_ tokens, lengths, response masks, ratings
    data = XwinSetPairsData(["xwin_set/samples.jsonl"], seq_len=512, batch_size=32,
                            rule=PairRule("lowest", min_margin=0.5))  # DPO on Xwin-Set

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
from xwin_jax.data.xwin_set import PairRule, make_pairs, skips_text
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
            self.file_identities.append(file_identity(path))
            pairs, skipped = self._read(path)
            self.pairs += pairs
            self.skipped += skipped
        self._check_enough()
        self.num_pairs = len(self.pairs)
        self._bind_given()

    def _read(self, path: str) -> tuple[list[formats.PreferencePair], list[str]]:
        result = formats.read_pairs(path, skip_invalid=self.skip_invalid)
        return result.records, result.skipped

    def _check_enough(self) -> None:
        if len(self.pairs) < self.batch_size:
            raise ConfigError(f"{list(self.paths)}: {len(self.pairs)} pairs, fewer than "
                              f"batch_size={self.batch_size}")

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


@dataclasses.dataclass
class XwinSetPairsData(PairsData):
    """DPO pairs made from Xwin-Set files (rejection sampling's samples.jsonl: every prompt's
    n scored responses) under `rule` (data/xwin_set.py: chosen = the best finished response,
    rejected by the rule's choice); the prompts that give no pair are counted by reason in
    `pair_skips` and in report()."""
    rule: PairRule = PairRule()

    def __post_init__(self):
        self.pair_skips: dict[str, int] = {}
        super().__post_init__()

    def _read(self, path: str) -> tuple[list[formats.PreferencePair], list[str]]:
        result = formats.read_xwin_set(path, skip_invalid=self.skip_invalid)
        made = make_pairs(result.records, self.rule)
        for reason, count in made.skipped.items():
            self.pair_skips[reason] = self.pair_skips.get(reason, 0) + count
        return made.pairs, result.skipped

    def _check_enough(self) -> None:
        if len(self.pairs) < self.batch_size:
            skips = skips_text(self.pair_skips) or "none"
            raise ConfigError(
                f"{list(self.paths)}: {len(self.pairs)} Xwin-Set pairs (rule "
                f"{self.rule.rejected!r}; prompts skipped: {skips}), fewer than "
                f"batch_size={self.batch_size}",
                hint="too_few: raise the sampling's max_new_tokens or num_samples (unfinished "
                     "samples never take part); margin: lower PairRule.min_margin")

    def report(self) -> str:
        skips = skips_text(self.pair_skips)
        return super().report().replace(
            "preference pairs", f"Xwin-Set pairs (rejected: {self.rule.rejected}"
            + (f"; prompts skipped: {skips}" if skips else "") + ")", 1)
