"""Batches of generation prompts (PPO rollouts), deterministic and resumable.

    data = PromptsData(["prompts.jsonl"], max_prompt_len=256, batch_size=64)
    batch = next(data.batches(0))   # tokens / mask / positions [B, max_prompt_len], index [B]

Prompts are read at construction (any prompts format: formats.read_prompts; a malformed file
fails at once, naming file:line). Once a vocabulary is bound (at construction when `vocabulary`
is given, else when the job binds its checkpoint's: `data.with_vocabulary(vocab)`,
batching.LazyVocabulary) they are rendered with the chat template up to "ASSISTANT:", and each
global batch is left-padded to its length bucket: its longest prompt rounded up to a multiple
of `bucket_multiple` (64; at most max_prompt_len), so a rollout's KV cache, scoring and update
are sized by the prompts actually drawn and only a few widths compile. Every host computes the
same width (it holds every prompt), so the hosts' slices agree. None pads to max_prompt_len.
Each epoch is a seeded permutation; batch k is a pure function of (files, vocabulary, seed, k).
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
class PromptsData(LazyVocabulary, GlobalBatches):
    paths: Sequence[str]
    max_prompt_len: int
    batch_size: int
    # A Vocabulary, 'bytes' or a tokenizer path; None: tokenized once the job binds one.
    vocabulary: Any = None
    seed: int = 0
    system: str | None = None
    skip_invalid: bool = False
    bucket_multiple: int | None = converters.BUCKET_MULTIPLE

    BOUND = ("ids",)

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.prompts: list[formats.Prompt] = []
        self.skipped = []
        self.file_identities = []  # of what was read: a file rewritten later is not this data
        for path in self.paths:
            result = formats.read_prompts(path, skip_invalid=self.skip_invalid)
            self.file_identities.append(file_identity(path))
            self.prompts += result.records
            self.skipped += result.skipped
        if len(self.prompts) < self.batch_size:
            raise ConfigError(f"{list(self.paths)}: {len(self.prompts)} prompts, fewer than "
                              f"batch_size={self.batch_size}")
        self._bind_given()

    def _tokenize(self, vocab) -> None:
        self.ids = [converters.prompt_ids(p.conversation, vocab, self.max_prompt_len,
                                          self.system) for p in self.prompts]

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        unbound = "" if self.has_vocabulary else " (no vocabulary yet)"
        return f"{len(self.prompts)} prompts{skipped}{unbound}"

    @property
    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def rows(self, step: int) -> np.ndarray:
        """The prompt indices of global batch `step`."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        return order[index * self.batch_size:(index + 1) * self.batch_size]

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.rows(step)
        width = self.max_prompt_len if self.bucket_multiple is None else \
            converters.bucket_width(max(len(self.ids[i]) for i in rows), self.bucket_multiple,
                                    self.max_prompt_len)
        batch = converters.left_padded_batch([self.ids[i] for i in rows], width,
                                             self.vocab.pad_id)
        batch["index"] = rows.astype(np.int32)
        return batch
