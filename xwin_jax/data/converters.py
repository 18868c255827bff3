"""Model-ready arrays for preference pairs and generation prompts.

    pairs_batch(pairs, vocab, seq_len)   → chosen_* and rejected_* rows, right-padded, each with
                                           the mask of its response tokens (and their </s>)
    prompts_batch(prompts, vocab, max_len) → left-padded prompt rows with positions from the mask

(Packed SFT rows are `packing.pack_examples`.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from xwin_jax.data import template
from xwin_jax.data.formats import ASSISTANT, Conversation, Message, PreferencePair
from xwin_jax.errors import ConfigError


def _response_tokens(prompt: Conversation, response: str, vocab, seq_len: int,
                     system: str | None) -> tuple[list[int], list[int]]:
    """prompt + response + </s>, with a mask on the response and its </s>. Over-long rows lose
    the start of the prompt (keeping BOS), so the response and its reward position survive."""
    full = Conversation(prompt.messages + (Message(ASSISTANT, response),), prompt.source)
    tokenized = template.tokenize_conversation(full, vocab, system=system)
    # Only the final answer is the response: earlier answers are context. The template ends
    # with it: its tokens are the trailing run of the loss mask.
    answer_len = len(tokenized.loss_mask) - _last_zero(tokenized.loss_mask) - 1
    prompt_len = len(tokenized.ids) - answer_len
    mask = [0] * prompt_len + [1] * answer_len
    ids = tokenized.ids
    if len(ids) > seq_len:
        overflow = len(ids) - seq_len
        if overflow > prompt_len - 1:  # BOS + the whole response must still fit
            raise ConfigError(f"{prompt.source or 'pair'}: the response alone ({answer_len} "
                              f"tokens) does not fit seq_len={seq_len}")
        ids = ids[:1] + ids[1 + overflow:]
        mask = mask[:1] + mask[1 + overflow:]
    return ids, mask


def _last_zero(mask: Sequence[int]) -> int:
    for i in range(len(mask) - 1, -1, -1):
        if mask[i] == 0:
            return i
    return -1


def _right_pad(rows: Sequence[Sequence[int]], length: int, pad: int, dtype) -> np.ndarray:
    out = np.full((len(rows), length), pad, dtype)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return out


def pairs_batch(pairs: Sequence[PreferencePair], vocab, seq_len: int,
                system: str | None = None) -> dict[str, np.ndarray]:
    """chosen_tokens/rejected_tokens [B, seq_len] (right-padded with pad_id), their lengths,
    chosen_response_mask/rejected_response_mask (1 on response tokens and </s>), and the
    judge's ratings (NaN where absent) for margins or filtering."""
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        rows = [_response_tokens(p.prompt, getattr(p, side), vocab, seq_len, system)
                for p in pairs]
        out[f"{side}_tokens"] = _right_pad([r[0] for r in rows], seq_len, vocab.pad_id, np.int32)
        out[f"{side}_length"] = np.array([len(r[0]) for r in rows], np.int32)
        out[f"{side}_response_mask"] = _right_pad([r[1] for r in rows], seq_len, 0, np.float32)
        out[f"{side}_rating"] = np.array([np.nan if getattr(p, f"{side}_rating") is None
                                          else getattr(p, f"{side}_rating") for p in pairs],
                                         np.float32)
    return out


def responses_batch(prompts: Sequence[Conversation], responses: Sequence[str], vocab,
                    seq_len: int, system: str | None = None) -> dict[str, np.ndarray]:
    """tokens [B, seq_len] (prompt + response + </s>, right-padded, tokenized exactly as a
    preference pair's side) and mask [B, seq_len]: what a reward model scores."""
    rows = [_response_tokens(p, r, vocab, seq_len, system)[0]
            for p, r in zip(prompts, responses, strict=True)]
    tokens = _right_pad(rows, seq_len, vocab.pad_id, np.int32)
    lengths = np.array([len(r) for r in rows])
    return {"tokens": tokens,
            "mask": (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)}


def prompt_ids(prompt: Conversation, vocab, max_len: int, system: str | None = None
               ) -> list[int]:
    """A generation prompt's ids; longer than max_len, it keeps BOS and its last max_len - 1
    tokens (the end, with "ASSISTANT:", matters most)."""
    ids = template.tokenize_prompt(prompt, vocab, system)
    if len(ids) > max_len:
        ids = ids[:1] + ids[len(ids) - max_len + 1:]
    return ids


BUCKET_MULTIPLE = 64


def bucket_width(length: int, multiple: int = BUCKET_MULTIPLE, limit: int | None = None) -> int:
    """The padded width of a length bucket: `length` rounded up to a multiple (so few shapes
    compile), at most `limit`."""
    width = -(-max(length, 1) // multiple) * multiple
    return width if limit is None else min(width, limit)


def left_padded_batch(rows: Sequence[Sequence[int]], width: int, pad_id: int
                      ) -> dict[str, np.ndarray]:
    """tokens [B, width] left-padded, mask (1 on real tokens), positions (0.. from the first
    real token)."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, ids in enumerate(rows):
        if len(ids) > width:
            raise ConfigError(f"row {r} has {len(ids)} tokens, more than width {width}")
        tokens[r, width - len(ids):] = ids
        mask[r, width - len(ids):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "positions": positions}


def prompts_batch(prompts: Sequence[Conversation], vocab, max_len: int,
                  system: str | None = None) -> dict[str, np.ndarray]:
    """Left-padded generation prompts [B, max_len] (see prompt_ids and left_padded_batch)."""
    return left_padded_batch([prompt_ids(p, vocab, max_len, system) for p in prompts], max_len,
                             vocab.pad_id)
