"""A file-free learnable SFT task (reverse a random symbol string) for tests and benchmarks.

Each batch is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would, and each host takes its own rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from xwin_jax.data.batching import GlobalBatches
from xwin_jax.errors import ConfigError

PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_SYMBOL = 4


@dataclasses.dataclass
class ReverseTask(GlobalBatches):
    """Rows: BOS x_1..x_n SEP x_n..x_1 EOS PAD...; the loss covers the reversed half + EOS."""
    batch_size: int
    seq_len: int
    vocab_size: int = 512
    num_symbols: int = 16
    seed: int = 0
    vocabulary = None  # its ids are its own symbols, not a tokenizer's

    def __post_init__(self):
        self.max_items = (self.seq_len - 3) // 2
        if self.max_items < 1:
            raise ConfigError(f"ReverseTask.seq_len={self.seq_len} is too short (needs >= 5)")
        if FIRST_SYMBOL + self.num_symbols > self.vocab_size:
            raise ConfigError(f"ReverseTask.num_symbols={self.num_symbols} does not fit "
                              f"vocab_size={self.vocab_size}")

    def with_vocabulary(self, vocab) -> "ReverseTask":
        """The same task: its ids do not come from a tokenizer (checked to fit, though)."""
        if vocab.vocab_size < FIRST_SYMBOL + self.num_symbols:
            raise ConfigError(f"ReverseTask needs {FIRST_SYMBOL + self.num_symbols} ids; the "
                              f"vocabulary has {vocab.vocab_size}")
        return self

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        tokens = np.full((self.batch_size, self.seq_len + 1), PAD, np.int32)
        weights = np.zeros((self.batch_size, self.seq_len + 1), np.float32)
        for row in range(self.batch_size):
            n = int(rng.integers(1, self.max_items + 1))
            items = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.num_symbols, n)
            seq = np.concatenate([[BOS], items, [SEP], items[::-1], [EOS]])
            tokens[row, :len(seq)] = seq
            weights[row, n + 2:len(seq)] = 1.0  # the reversed items and EOS are targets
        return {"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
                "loss_weights": weights[:, 1:],
                "segment_ids": (tokens[:, :-1] != PAD).astype(np.int32)}
