"""What PPO and rejection sampling do with sampled responses: put prompt and response in one
row, and score the response tokens under the policy, reference and value models (the reward
model's score is rewards.RewardScorer's).

A rollout row is the left-padded prompt [P] followed by the generated tokens [T] (padding after
EOS). Response token t is predicted from position P - 1 + t, which is also where the value
model's estimate for it is read. The reward model reads the last real token (EOS when there is
one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, positions_from_mask
from xwin_jax.sampling import Generation


def assemble(prompt_tokens, prompt_mask, generation: Generation) -> dict:
    """tokens/mask [B, P + T], response_mask [B, T] (1 through EOS), finished [B], and the
    sampler's log-probs [B, T]. Host arrays in, host arrays out; jax arrays (inside jit, the
    PPO rollout) in, jax arrays out."""
    xp = np if isinstance(generation.tokens, np.ndarray) else jnp
    width = generation.tokens.shape[1]
    response_mask = (xp.arange(width)[None, :] < generation.lengths[:, None]).astype(xp.int32)
    return {"tokens": xp.concatenate([xp.asarray(prompt_tokens, xp.int32),
                                      generation.tokens.astype(xp.int32)], axis=1),
            "mask": xp.concatenate([xp.asarray(prompt_mask, xp.int32), response_mask], axis=1),
            "response_mask": response_mask,
            "finished": generation.finished.astype(bool),
            "sampler_logprobs": generation.logprobs.astype(xp.float32)}


def response_logprobs(cfg: LlamaConfig, params: Any, tokens: jax.Array, mask: jax.Array,
                      prompt_len: int, temperature=1.0) -> tuple[jax.Array, jax.Array]:
    """(log p [B, T] of each response token, entropy [B, T]) under softmax(logits /
    temperature): the distribution the sampler drew from (without top-k/top-p).
    `temperature` is a scalar or one traced value per row [B]."""
    model = Llama(cfg)
    mask = mask.astype(jnp.int32)
    hidden = model.apply({"params": params}, tokens, positions=positions_from_mask(mask),
                         segment_ids=mask, return_hidden=True)
    logits = model.apply({"params": params}, hidden[:, prompt_len - 1:-1],
                         method=Llama.logits_from_hidden)
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32),
                                   tokens.shape[:1])[:, None, None]
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, prompt_len:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def response_values(cfg: LlamaConfig, params: Any, tokens: jax.Array, mask: jax.Array,
                    prompt_len: int) -> jax.Array:
    """The value model's raw estimate [B, T] before each response token."""
    scores = heads.RewardModel(cfg).apply({"params": params}, tokens, mask, per_token=True)
    return scores[:, prompt_len - 1:-1]
