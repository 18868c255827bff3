"""The one reward scorer: a reward model's score of (prompt, response), normalised in one place.

    scorer = RewardScorer.load(reward_dir, model, partitioner)
    scorer.score_tokens(tokens, mask)            # [B] normalised, rows of prompt + response
                                                 # (the whole batch, given on every host)
    scorer.score_texts(prompts, responses, ...)  # tokenized like the training pairs
    scorer.apply(params, tokens, mask)           # inside a jitted function (PPO's scoring)

A reward model's raw scores are centred and scaled with the mean and std of its rewards on a
reference set, which train_reward stores as final/reward_stats.json: the units PPO's KL
coefficient, rejection sampling's threshold and evaluation's RM columns are in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from xwin_jax.data import converters, formats
from xwin_jax.errors import ConfigError
from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import SCORE, Checkpoint, open_checkpoint
from xwin_jax.partitioning import Partitioner, host_value

STATS_FILE = "reward_stats.json"


@dataclasses.dataclass(frozen=True)
class RewardStats:
    mean: float = 0.0
    std: float = 1.0
    count: int = 0

    @classmethod
    def of(cls, rewards: np.ndarray) -> "RewardStats":
        rewards = np.asarray(rewards, np.float64)
        return cls(float(rewards.mean()), float(rewards.std()), int(rewards.size))

    @classmethod
    def load(cls, reward_dir: str) -> "RewardStats":
        """The stats stored beside a reward model (the identity, said aloud, when absent)."""
        path = os.path.join(reward_dir, STATS_FILE)
        if not os.path.exists(path):
            _note_once(f"[rewards] no {path}: scores are used unnormalised")
            return cls()
        with open(path) as f:
            stats = json.load(f)
        if not stats.get("std"):
            raise ConfigError(f"{path}: std is {stats.get('std')!r}; cannot normalise rewards")
        return cls(float(stats["mean"]), float(stats["std"]), int(stats.get("count", 0)))

    def save(self, reward_dir: str) -> None:
        if jax.process_index() == 0:
            with open(os.path.join(reward_dir, STATS_FILE), "w") as f:
                json.dump(dataclasses.asdict(self), f, indent=2)

    def normalise(self, raw):
        return (raw - self.mean) / self.std


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    print(message)


def raw_scores(cfg: LlamaConfig, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """A score model's raw score [B] at each row's last real token."""
    return heads.RewardModel(cfg).apply({"params": params}, tokens, mask)


def open_reward(reward_dir: str, model: LlamaConfig | None, vocab: Any = None
                ) -> dict[str, Any]:
    """The reward model as a stage's input, without its weights: {"checkpoint", "stats"},
    what determines its scores (a stage's fingerprint). It must be a score model, and read
    the same tokenizer as `vocab` (the policy's) when one is given."""
    checkpoint = open_checkpoint(reward_dir, model, what="REWARD_DIR")
    if checkpoint.kind != SCORE:
        raise ConfigError(f"REWARD_DIR={checkpoint.path} holds a {checkpoint.kind!r} model, "
                          f"not a reward model", hint="train one with gin/runs/reward.gin")
    if vocab is not None:
        checkpoint.check_vocabulary(vocab, "REWARD_DIR")
    return {"checkpoint": checkpoint, "stats": RewardStats.load(reward_dir)}


@dataclasses.dataclass
class RewardScorer:
    checkpoint: Checkpoint
    stats: RewardStats
    partitioner: Partitioner
    params: Any
    shardings: Any

    @classmethod
    def load(cls, reward_dir: str, model: LlamaConfig | None,
             partitioner: Partitioner | None = None) -> "RewardScorer":
        """The reward model in `reward_dir` placed on the partitioner's devices (all of them
        by default, as every stage's partitioner)."""
        from xwin_jax.train.sharded import frozen_params
        partitioner = partitioner or Partitioner()
        opened = open_reward(reward_dir, model)
        params, shardings = frozen_params(opened["checkpoint"], SCORE, partitioner)
        return cls(opened["checkpoint"], opened["stats"], partitioner, params, shardings)

    @property
    def config(self) -> LlamaConfig:
        return self.checkpoint.config

    def fingerprint(self) -> dict:
        return {"checkpoint": self.checkpoint, "stats": self.stats}

    def apply(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Normalised scores [B]; traceable (use inside jit with this scorer's params)."""
        return self.stats.normalise(raw_scores(self.config, params, tokens, mask))

    def _jitted(self):
        if not hasattr(self, "_score"):
            batch = self.partitioner.batch_sharding
            self._score = self.partitioner.partition(
                self.apply, in_shardings=(self.shardings, batch, batch),
                out_shardings=self.partitioner.replicated)
        return self._score

    def score_tokens(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Normalised scores [B] of a whole batch (prompt + response, mask 1 on real tokens)
        given identically on every host, as every host reads every prompt and output
        (rejection sampling, evaluation); every host gets every score. B must be a multiple
        of the partitioner's batch_divisor (data x fsdp). Each width compiles once."""
        placed = self.partitioner.put_global_batch({"tokens": tokens, "mask": mask})
        return host_value(self._jitted()(self.params, placed["tokens"], placed["mask"]))

    def score_texts(self, prompts: Sequence[str | formats.Conversation],
                    responses: Sequence[str], vocab, *, seq_len: int = 1024,
                    batch_size: int = 16, system: str | None = None) -> np.ndarray:
        """Normalised scores [N] of (prompt, response) pairs tokenized as in the training
        pairs (the conversation, the response, </s>), in fixed [batch_size, seq_len] batches
        so any N compiles once (batch_size rounded up to a multiple of the batch divisor).
        Every host passes every pair and gets every score."""
        divisor = self.partitioner.batch_divisor
        batch_size = -(-batch_size // divisor) * divisor
        conversations = [p if isinstance(p, formats.Conversation) else
                         formats.Conversation((formats.Message(formats.USER, p),))
                         for p in prompts]
        out = []
        for start in range(0, len(conversations), batch_size):
            rows = list(range(start, min(start + batch_size, len(conversations))))
            padded = rows + [rows[-1]] * (batch_size - len(rows))
            batch = converters.responses_batch([conversations[i] for i in padded],
                                               [responses[i] for i in padded], vocab, seq_len,
                                               system)
            out.append(self.score_tokens(batch["tokens"], batch["mask"])[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
