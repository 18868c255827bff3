"""Jitted generation: prefill, then a lax.while_loop decode over a preallocated KV cache.

    out = generate(params, cfg, prompt_tokens, prompt_mask, jax.random.key(0),
                   max_new_tokens=256, temperature=0.7, top_p=0.95, stop_ids=(2,))
    out.tokens [B, N], out.logprobs [B, N], out.lengths [B], out.finished [B]

Prompts are left-padded (converters.prompts_batch), positions come from the mask, so every
row's last prompt token sits in the same slot and all rows decode in lockstep. One program:
no Python per token; the loop stops when every row has finished or the budget is spent.

Log-probs are those of the distribution actually sampled from: logits / temperature, after
top-k / top-p filtering — what PPO must score against. Greedy (temperature 0) reports the
plain log-softmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, init_cache, positions_from_mask


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, N] new tokens, pad after a row finished
    logprobs: np.ndarray  # [B, N] log-prob of each new token (0 after finishing)
    lengths: np.ndarray  # [B] new tokens up to and including the stop token
    finished: np.ndarray  # [B] True where a stop token was produced

    def response_ids(self, row: int) -> np.ndarray:
        """Row's new tokens without its stop token."""
        n = int(self.lengths[row])
        return self.tokens[row, :n - 1 if self.finished[row] else n]

    def texts(self, vocab) -> list[str]:
        """Every row's response, decoded and stripped (the stop token left out)."""
        return [vocab.decode(self.response_ids(r)).strip() for r in range(len(self.lengths))]


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits [B, V] with everything outside the top-k, then the nucleus (the smallest set of
    most likely tokens whose mass reaches top_p), set to -inf. Filtering is by rank, so ties
    at the cut-off do not widen the set; the most likely token always survives."""
    vocab = logits.shape[-1]
    if not (top_k and top_k < vocab) and top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # stable: ties keep vocabulary order
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.ones(ordered.shape, bool)
    if top_k and top_k < vocab:
        keep = jnp.arange(vocab) < top_k
        ordered = jnp.where(keep, ordered, -jnp.inf)
    if top_p < 1.0:
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = keep & (jnp.cumsum(probs, axis=-1) - probs < top_p)
    ranks = jnp.argsort(order, axis=-1)
    return jnp.where(jnp.take_along_axis(jnp.broadcast_to(keep, logits.shape), ranks, -1),
                     logits, -jnp.inf)


def sample_token(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-prob [B]) from fp32 logits [B, V], one PRNG key per row."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits / temperature, top_k, top_p)
        token = jax.vmap(jax.random.categorical)(keys, filtered)
        logprobs = jax.nn.log_softmax(filtered, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0]


def _step_keys(row_keys: jax.Array, step) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_ids", "pad_id"))
def _generate(params, prompt_tokens, prompt_mask, row_keys, *, cfg, max_new_tokens, temperature,
              top_k, top_p, stop_ids, pad_id):
    model = Llama(cfg)
    batch, prompt_len = prompt_tokens.shape
    total = prompt_len + max_new_tokens
    slots = jnp.arange(total)
    prompt_mask = prompt_mask.astype(bool)
    filled = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(prompt_mask)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def is_stop(token):
        return jnp.any(token[:, None] == stops[None, :], axis=-1)

    # Prefill: the prompt attends causally to its real tokens.
    attend = filled[:, None, :] & (slots[None, None, :] <= jnp.arange(prompt_len)[None, :, None])
    hidden, cache = model.apply({"params": params}, prompt_tokens,
                                positions=positions_from_mask(prompt_mask),
                                cache=init_cache(cfg, batch, total), cache_index=0,
                                attention_mask=attend, return_hidden=True)
    # Only the last prompt position needs logits: [B, 1, V] instead of [B, P, V].
    logits = model.apply({"params": params}, hidden[:, -1:], method=Llama.logits_from_hidden)
    first, first_logprob = sample_token(logits[:, 0], _step_keys(row_keys, 0), temperature,
                                        top_k, top_p)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logprob)
    prompt_lengths = prompt_mask.sum(axis=1)
    state = (jnp.int32(1), tokens, logprobs, cache, filled, is_stop(first),
             jnp.ones((batch,), jnp.int32))

    def keep_going(state):
        step, *_, finished, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def decode(state):
        step, tokens, logprobs, cache, filled, finished, lengths = state
        slot = prompt_len + step - 1  # where the previous token goes
        filled = filled.at[:, slot].set(True)
        attend = filled[:, None, :] & (slots <= slot)[None, None, :]
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        logits, cache = model.apply({"params": params}, previous,
                                    positions=(prompt_lengths + step - 1)[:, None],
                                    cache=cache, cache_index=slot, attention_mask=attend)
        token, logprob = sample_token(logits[:, 0], _step_keys(row_keys, step), temperature,
                                      top_k, top_p)
        token = jnp.where(finished, pad_id, token)
        logprob = jnp.where(finished, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], step, axis=1)
        lengths = lengths + (~finished).astype(jnp.int32)
        return step + 1, tokens, logprobs, cache, filled, finished | is_stop(token), lengths

    _, tokens, logprobs, _, _, finished, lengths = jax.lax.while_loop(keep_going, decode, state)
    return tokens, logprobs, lengths, finished


# The jitted program behind generate(), for lowering ahead of time (aot.py).
generate_program = _generate


def generate(params: Any, cfg: LlamaConfig, prompt_tokens, prompt_mask, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (2,), pad_id: int = 0,
             partitioner: Any = None) -> Generation:
    """Samples up to max_new_tokens for a left-padded batch; see the module docstring.

    `key` is one PRNG key (row r samples with split(key, B)[r]) or a [B] array of keys, one
    per row, so a prompt's sample need not depend on its batch-mates (generate job, server).
    With a partitioner, the prompts are sharded over (data, fsdp) and the model's logical
    constraints apply (heads over tensor); params should already carry their shardings."""
    if not stop_ids:
        raise ValueError("stop_ids must name at least the EOS id")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need "
                         f"temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_mask = np.asarray(prompt_mask, np.int32)
    row_keys = key if key.ndim == 1 else jax.random.split(key, prompt_tokens.shape[0])
    if row_keys.shape != (prompt_tokens.shape[0],):
        raise ValueError(f"{row_keys.shape[0]} row keys for {prompt_tokens.shape[0]} prompts")
    context = contextlib.nullcontext()
    if partitioner is not None:
        batch = partitioner.shard_batch({"tokens": prompt_tokens, "mask": prompt_mask})
        prompt_tokens, prompt_mask = batch["tokens"], batch["mask"]
        context = partitioner.activation_context()
    with context:
        tokens, logprobs, lengths, finished = _generate(
            params, prompt_tokens, prompt_mask, row_keys, cfg=cfg,
            max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p), stop_ids=tuple(int(i) for i in stop_ids),
            pad_id=int(pad_id))
    return Generation(*(np.asarray(x) for x in (tokens, logprobs, lengths, finished)))
