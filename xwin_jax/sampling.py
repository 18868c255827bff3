"""Jitted generation: prefill, then a lax.while_loop decode over a preallocated KV cache.

    out = generate(params, cfg, prompt_tokens, prompt_mask, jax.random.key(0),
                   max_new_tokens=256, temperature=0.7, top_p=0.95, stop_ids=(2,))
    out.tokens [B, N], out.logprobs [B, N], out.lengths [B], out.finished [B]

Prompts are left-padded (converters.prompts_batch), positions come from the mask, so every
row's last prompt token sits in the same slot and all rows decode in lockstep. One program:
no Python per token; the loop stops when every row has finished or the budget is spent.

Sampling settings are traced, one value per row (a scalar applies to every row): one compiled
program serves any mix of temperatures, top-k and top-p, so a server can batch requests with
different settings and a new value never recompiles. Temperature 0 is greedy for its row,
top_k 0 and top_p 1 are off. The one static choice is the `mode`, picked on the host from the
values (`sampling_mode`): 'greedy' when every row is greedy (no random numbers drawn),
'sample' when no sampled row filters (no vocabulary sort), 'filter' otherwise — at most three
programs per shape.

Log-probs are those of the distribution actually sampled from: logits / temperature, after
top-k / top-p filtering — what PPO must score against. A greedy row reports the plain
log-softmax.

`stream(...)` runs the same decode in chunks on a carried state (a prefill program that
samples the first token, then one call per `chunk_tokens` steps with the KV cache donated) and
yields the tokens so far after each, so a server can send text before the answer is complete.
For the same inputs and keys it yields what `generate` returns in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, init_cache, positions_from_mask

MODES = ("greedy", "sample", "filter")


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


class Settings(NamedTuple):
    """Per-row sampling settings, traced: temperature [B] f32 (0 = greedy), top_k [B] i32
    (0 = off), top_p [B] f32 (1 = off)."""
    temperature: Any
    top_k: Any
    top_p: Any


def row_settings(batch: int, temperature=0.0, top_k=0, top_p=1.0) -> Settings:
    """Host arrays [batch] from scalars or per-row sequences, after checking every value."""
    settings = Settings(*(np.broadcast_to(np.asarray(value, dtype), (batch,))
                          for value, dtype in ((temperature, np.float32), (top_k, np.int32),
                                               (top_p, np.float32))))
    if not (np.all(settings.temperature >= 0) and np.all(settings.top_k >= 0)
            and np.all((settings.top_p > 0) & (settings.top_p <= 1))):
        raise ConfigError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need "
                          f"temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    return settings


def sampling_mode(settings: Settings, vocab_size: int) -> str:
    """The cheapest program that samples these settings exactly (see the module docstring)."""
    sampled = np.asarray(settings.temperature) > 0
    if not sampled.any():
        return "greedy"
    top_k, top_p = np.asarray(settings.top_k), np.asarray(settings.top_p)
    filters = ((top_k > 0) & (top_k < vocab_size)) | (top_p < 1)
    return "filter" if (filters & sampled).any() else "sample"


def filter_logits(logits: jax.Array, top_k=0, top_p=1.0) -> jax.Array:
    """Logits [B, V] with everything outside the top-k, then the nucleus (the smallest set of
    most likely tokens whose mass reaches top_p), set to -inf; top_k and top_p are scalars or
    per row [B], 0 and 1 meaning off. Filtering is by rank, so ties at the cut-off do not
    widen the set; the most likely token always survives. Always sorts the vocabulary: only
    call it when some row filters."""
    vocab = logits.shape[-1]
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), logits.shape[:-1])[..., None]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits.shape[:-1])[..., None]
    order = jnp.argsort(-logits, axis=-1)  # stable: ties keep vocabulary order
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
    ordered = jnp.where(keep, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # top_p = 1 keeps everything outright: a cumulative sum that rounds to 1 early must not
    # drop the tail.
    keep = keep & ((jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0))
    ranks = jnp.argsort(order, axis=-1)
    return jnp.where(jnp.take_along_axis(keep, ranks, -1), logits, -jnp.inf)


def sample_token(logits: jax.Array, keys: jax.Array, temperature, top_k=0, top_p=1.0,
                 mode: str = "filter") -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-prob [B]) from fp32 logits [B, V], one PRNG key per row; the
    settings are scalars or per row [B]. `mode` is static: 'filter' is right for any settings,
    'sample' only when no sampled row filters, 'greedy' only when every row is greedy."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    logits = logits.astype(jnp.float32)
    if mode == "greedy":
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32),
                                       logits.shape[:1])[:, None]
        sampled = temperature > 0
        # A greedy row is divided by 1 and left unfiltered: its argmax and plain log-softmax.
        scaled = logits / jnp.where(sampled, temperature, 1.0)
        if mode == "filter":
            scaled = filter_logits(scaled, jnp.where(sampled[:, 0], top_k, 0),
                                   jnp.where(sampled[:, 0], top_p, 1.0))
        token = jnp.where(sampled[:, 0], jax.vmap(jax.random.categorical)(keys, scaled),
                          jnp.argmax(scaled, axis=-1))
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0]


def _step_keys(row_keys: jax.Array, step) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


class DecodeState(NamedTuple):
    """What the decode loop carries; `stream` passes it from one chunk to the next."""
    step: jax.Array  # () new tokens so far, the same for every row
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]
    cache: dict
    filled: jax.Array  # [B, P + N] slots holding a real token
    finished: jax.Array  # [B]
    lengths: jax.Array  # [B]
    prompt_lengths: jax.Array  # [B]


def _is_stop(token, stop_ids):
    return jnp.any(token[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)


def _prefill(params, prompt_tokens, prompt_mask, row_keys, settings, *, cfg, max_new_tokens,
             mode, stop_ids, pad_id) -> DecodeState:
    """The prompt through the model into a fresh cache, and the first new token."""
    model = Llama(cfg)
    batch, prompt_len = prompt_tokens.shape
    total = prompt_len + max_new_tokens
    slots = jnp.arange(total)
    prompt_mask = prompt_mask.astype(bool)
    filled = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(prompt_mask)
    # The prompt attends causally to its real tokens.
    attend = filled[:, None, :] & (slots[None, None, :] <= jnp.arange(prompt_len)[None, :, None])
    hidden, cache = model.apply({"params": params}, prompt_tokens,
                                positions=positions_from_mask(prompt_mask),
                                cache=init_cache(cfg, batch, total), cache_index=0,
                                attention_mask=attend, return_hidden=True)
    # Only the last prompt position needs logits: [B, 1, V] instead of [B, P, V].
    logits = model.apply({"params": params}, hidden[:, -1:], method=Llama.logits_from_hidden)
    first, first_logprob = sample_token(logits[:, 0], _step_keys(row_keys, 0), *settings,
                                        mode=mode)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logprob)
    return DecodeState(jnp.int32(1), tokens, logprobs, cache, filled, _is_stop(first, stop_ids),
                       jnp.ones((batch,), jnp.int32), prompt_mask.sum(axis=1))


def _decode(params, state: DecodeState, row_keys, settings, end, *, cfg, mode, stop_ids,
            pad_id) -> DecodeState:
    """One token per step until step `end` or until every row has finished."""
    model = Llama(cfg)
    max_new_tokens = state.tokens.shape[1]
    prompt_len = state.filled.shape[1] - max_new_tokens
    slots = jnp.arange(state.filled.shape[1])

    def keep_going(state):
        return (state.step < end) & ~jnp.all(state.finished)

    def decode(state):
        step, tokens, logprobs, cache, filled, finished, lengths, prompt_lengths = state
        slot = prompt_len + step - 1  # where the previous token goes
        filled = filled.at[:, slot].set(True)
        attend = filled[:, None, :] & (slots <= slot)[None, None, :]
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        logits, cache = model.apply({"params": params}, previous,
                                    positions=(prompt_lengths + step - 1)[:, None],
                                    cache=cache, cache_index=slot, attention_mask=attend)
        token, logprob = sample_token(logits[:, 0], _step_keys(row_keys, step), *settings,
                                      mode=mode)
        token = jnp.where(finished, pad_id, token)
        logprob = jnp.where(finished, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], step, axis=1)
        lengths = lengths + (~finished).astype(jnp.int32)
        return DecodeState(step + 1, tokens, logprobs, cache, filled,
                           finished | _is_stop(token, stop_ids), lengths, prompt_lengths)

    return jax.lax.while_loop(keep_going, decode, state)


_STATIC = ("cfg", "mode", "stop_ids", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC + ("max_new_tokens",))
def _generate(params, prompt_tokens, prompt_mask, row_keys, settings, *, cfg, max_new_tokens,
              mode, stop_ids, pad_id):
    static = dict(cfg=cfg, mode=mode, stop_ids=stop_ids, pad_id=pad_id)
    state = _prefill(params, prompt_tokens, prompt_mask, row_keys, settings,
                     max_new_tokens=max_new_tokens, **static)
    state = _decode(params, state, row_keys, settings, max_new_tokens, **static)
    return state.tokens, state.logprobs, state.lengths, state.finished


# The jitted program behind generate(), for lowering ahead of time (aot.py).
generate_program = _generate

# stream()'s two programs: the prefill, and `chunk_tokens` more steps on a donated state.
_start = jax.jit(_prefill, static_argnames=_STATIC + ("max_new_tokens",))


@functools.partial(jax.jit, static_argnames=_STATIC + ("chunk_tokens",), donate_argnums=(1,))
def _continue(params, state, row_keys, settings, *, cfg, chunk_tokens, mode, stop_ids, pad_id):
    end = jnp.minimum(state.step + chunk_tokens, state.tokens.shape[1])
    return _decode(params, state, row_keys, settings, end, cfg=cfg, mode=mode,
                   stop_ids=stop_ids, pad_id=pad_id)


def stream_program_count() -> int:
    """Programs stream() has compiled in this process (prefill and chunk; every shape, mode
    and chunk size), for servers that bound their compilations."""
    return _start._cache_size() + _continue._cache_size()


def _inputs(cfg: LlamaConfig, prompt_tokens, prompt_mask, key, temperature, top_k, top_p,
            stop_ids, pad_id):
    """Checked host inputs and the static arguments both entry points share."""
    if not stop_ids:
        raise ValueError("stop_ids must name at least the EOS id")
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_mask = np.asarray(prompt_mask, np.int32)
    batch = prompt_tokens.shape[0]
    settings = row_settings(batch, temperature, top_k, top_p)
    row_keys = key if key.ndim == 1 else jax.random.split(key, batch)
    if row_keys.shape != (batch,):
        raise ValueError(f"{row_keys.shape[0]} row keys for {batch} prompts")
    static = dict(cfg=cfg, mode=sampling_mode(settings, cfg.vocab_size),
                  stop_ids=tuple(int(i) for i in stop_ids), pad_id=int(pad_id))
    return prompt_tokens, prompt_mask, row_keys, settings, static


def generate(params: Any, cfg: LlamaConfig, prompt_tokens, prompt_mask, key: jax.Array, *,
             max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
             stop_ids: Sequence[int] = (2,), pad_id: int = 0,
             partitioner: Any = None) -> Generation:
    """Samples up to max_new_tokens for a left-padded batch; see the module docstring.

    `key` is one PRNG key (row r samples with split(key, B)[r]) or a [B] array of keys, one
    per row, so a prompt's sample need not depend on its batch-mates (generate job, server).
    temperature, top_k and top_p are scalars or one value per row.
    With a partitioner, the whole batch is given on every host (every host passes the same
    arrays) and each device takes its rows over (data, fsdp); the model's logical constraints
    apply (heads over tensor); params should already carry their shardings (on one host, a
    decoding.Decoder's layout or the training one). Every host gets the whole result."""
    prompt_tokens, prompt_mask, row_keys, settings, static = _inputs(
        cfg, prompt_tokens, prompt_mask, key, temperature, top_k, top_p, stop_ids, pad_id)
    context = contextlib.nullcontext()
    if partitioner is not None:
        from xwin_jax.partitioning import host_value
        placed = partitioner.put_global_batch({
            "tokens": prompt_tokens, "mask": prompt_mask,
            "keys": np.asarray(jax.random.key_data(row_keys)), **settings._asdict()})
        prompt_tokens, prompt_mask = placed["tokens"], placed["mask"]
        row_keys = jax.random.wrap_key_data(placed["keys"])
        settings = Settings(*(placed[name] for name in Settings._fields))
        context = partitioner.activation_context()
    else:
        host_value = np.asarray
    with context:
        tokens, logprobs, lengths, finished = _generate(
            params, prompt_tokens, prompt_mask, row_keys, settings,
            max_new_tokens=int(max_new_tokens), **static)
    return Generation(*(host_value(x) for x in (tokens, logprobs, lengths, finished)))


# Settings that select each mode, for compiling a mode's programs ahead of real requests.
_MODE_SETTINGS = {"greedy": (0.0, 0, 1.0), "sample": (1.0, 0, 1.0), "filter": (1.0, 1, 1.0)}


def compile_stream(params: Any, cfg: LlamaConfig, batch: int, prompt_len: int,
                   max_new_tokens: int, mode: str, *, stop_ids: Sequence[int], pad_id: int,
                   chunk_tokens: int) -> None:
    """Runs stream()'s two programs once on dummy inputs of this shape and mode (the prefill
    and one chunk, whether or not the dummy rows finish), so that a server's first request
    of the shape finds them compiled."""
    tokens, mask, row_keys, settings, static = _inputs(
        cfg, np.full((batch, prompt_len), pad_id), np.ones((batch, prompt_len)),
        jax.random.key(0), *_MODE_SETTINGS[mode], stop_ids, pad_id)
    state = _start(params, tokens, mask, row_keys, settings,
                   max_new_tokens=int(max_new_tokens), **static)
    jax.block_until_ready(_continue(params, state, row_keys, settings,
                                    chunk_tokens=int(chunk_tokens), **static))


def stream(params: Any, cfg: LlamaConfig, prompt_tokens, prompt_mask, key: jax.Array, *,
           max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
           stop_ids: Sequence[int] = (2,), pad_id: int = 0,
           chunk_tokens: int = 16) -> Iterator[Generation]:
    """generate(), a chunk at a time: yields a Generation of the tokens so far ([B, step])
    after the first token and after every `chunk_tokens` more, until every row has finished
    or the budget is spent. Stop iterating to abandon the rest. Compiled programs depend on
    the shapes, the mode and chunk_tokens, never on the settings' values."""
    prompt_tokens, prompt_mask, row_keys, settings, static = _inputs(
        cfg, prompt_tokens, prompt_mask, key, temperature, top_k, top_p, stop_ids, pad_id)
    state = _start(params, prompt_tokens, prompt_mask, row_keys, settings,
                   max_new_tokens=int(max_new_tokens), **static)
    while True:
        # Copies, not views: the next call donates these buffers.
        step, tokens, logprobs, finished, lengths = (
            np.array(x) for x in (state.step, state.tokens, state.logprobs, state.finished,
                                  state.lengths))
        yield Generation(tokens[:, :step], logprobs[:, :step], lengths, finished)
        if step >= max_new_tokens or finished.all():
            return
        state = _continue(params, state, row_keys, settings, chunk_tokens=int(chunk_tokens),
                          **static)
