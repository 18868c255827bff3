"""Scalar heads on a Llama trunk: reward models (Xwin-RM) and PPO value models.

    scores = RewardModel(cfg).apply({"params": params}, tokens, mask)          # [B]
    values = RewardModel(cfg).apply({"params": params}, tokens, mask,
                                    per_token=True)                           # [B, S]

Params: {"model": <Llama trunk, no LM head>, "score": {"kernel": [hidden, 1]}}, the layout of
HF's LlamaForSequenceClassification (`model.*` and `score.weight`). The reward is read at the
last real token of each row, so left- and right-padded batches score the same.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, positions_from_mask

TRUNK = "model"
HEAD = "score"


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last real (mask 1) token in each row; works for any padding side."""
    index = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask.astype(bool), index, -1), axis=-1)


class ScoreHead(nn.Module):
    """hidden [..., D] → a scalar per position, computed in fp32; init std 1/sqrt(D + 1)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        init = nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5), ("embed", "score"))
        kernel = self.param("kernel", init, (cfg.hidden_size, 1), jnp.dtype(cfg.param_dtype))
        return jnp.einsum("...d,do->...o", hidden.astype(jnp.float32),
                          kernel.astype(jnp.float32))[..., 0]


class RewardModel(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, per_token: bool = False):
        """tokens, mask [B, S] (mask 1 on real tokens) → scores [B] at the last real token, or
        [B, S] at every position with per_token (a value model's view)."""
        mask = mask.astype(jnp.int32)
        # Padding is its own segment: real tokens never attend to it, whichever side it is on.
        hidden = Llama(self.config, name=TRUNK)(tokens, positions=positions_from_mask(mask),
                                                segment_ids=mask, return_hidden=True)
        scores = ScoreHead(self.config, name=HEAD)(hidden)
        if per_token:
            return scores
        return jnp.take_along_axis(scores, last_token_index(mask)[:, None], axis=1)[:, 0]


def _init_variables(cfg: LlamaConfig, key: jax.Array):
    ones = jnp.ones((1, 1), jnp.int32)
    return RewardModel(cfg).init(key, ones, ones)


def init_reward_params(cfg: LlamaConfig, key: jax.Array) -> Any:
    """Random params: trunk weights std 0.02 (norms 1), head std 1/sqrt(d+1)."""
    return nn.meta.unbox(_init_variables(cfg, key)["params"])


def reward_param_shapes(cfg: LlamaConfig) -> Any:
    return nn.meta.unbox(jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))[
        "params"])


def reward_param_logical_axes(cfg: LlamaConfig) -> Any:
    abstract = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))
    return nn.get_partition_spec(abstract)["params"]


def reward_params_from_trunk(trunk: Any, cfg: LlamaConfig, key: jax.Array) -> Any:
    """An RM initialised from an LM (e.g. the SFT model): its trunk, a fresh head; the LM
    head is dropped."""
    head = init_reward_params(cfg, key)[HEAD]
    return {TRUNK: {k: v for k, v in trunk.items() if k != "lm_head"}, HEAD: head}
