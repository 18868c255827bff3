"""Batches of generation prompts (PPO rollouts), deterministic and resumable.

    data = PromptsData(["prompts.jsonl"], max_prompt_len=256, batch_size=64)
    batch = next(data.batches(0))   # tokens / mask / positions [B, max_prompt_len], index [B]

Prompts are read (any prompts format: formats.read_prompts), rendered with the chat template up
to "ASSISTANT:" and left-padded to one fixed width, so every rollout compiles once. Each epoch
is a seeded permutation; batch k is a pure function of (files, seed, k).
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
class PromptsData(GlobalBatches):
    paths: Sequence[str]
    max_prompt_len: int
    batch_size: int
    vocabulary: str = "bytes"
    seed: int = 0
    system: str | None = None
    skip_invalid: bool = False

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.vocab = get_vocabulary(self.vocabulary)
        self.prompts: list[formats.Prompt] = []
        self.skipped = []
        for path in self.paths:
            result = formats.read_prompts(path, skip_invalid=self.skip_invalid)
            self.prompts += result.records
            self.skipped += result.skipped
        if len(self.prompts) < self.batch_size:
            raise ConfigError(f"{list(self.paths)}: {len(self.prompts)} prompts, fewer than "
                              f"batch_size={self.batch_size}")
        self.ids = [converters.prompt_ids(p.conversation, self.vocab, self.max_prompt_len,
                                          self.system) for p in self.prompts]

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        return f"{len(self.prompts)} prompts{skipped}"

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
        batch = converters.left_padded_batch([self.ids[i] for i in rows], self.max_prompt_len,
                                             self.vocab.pad_id)
        batch["index"] = rows.astype(np.int32)
        return batch
