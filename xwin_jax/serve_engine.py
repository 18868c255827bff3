"""The server's decode engine: waiting requests batched together and decoded a chunk at a time.

Every choice of every request is a `Row`. One worker thread takes the rows that are waiting
(up to max_batch_size, whatever their sampling settings: temperature, top-k and top-p are
traced per row, see sampling.py) and decodes them together with `sampling.stream`, handing
each row's new tokens to its sink after the prefill and after every `chunk_tokens` decode
steps. A row stops being sent tokens at its stop token, at its own max_tokens, or when it is
cancelled (a stop string was seen, the client left); the batch ends when all its rows have.

Compiled programs depend on shapes, never on settings' values, and shapes come in buckets:
the batch is always max_batch_size rows, the prompt width a power of two from 64 up to the
prompt limit, the token budget a power of two from 16 up to the max_tokens limit (each
list ending at its limit). So the server compiles at most
2 (prefill, chunk) x 3 (sampling modes) x len(prompt_buckets) x len(budget_buckets) programs
(`program_bound`); `warm_up` compiles the common ones before the first request.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from xwin_jax import sampling
from xwin_jax.data import converters
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig

SMALLEST_PROMPT_BUCKET = 64
SMALLEST_BUDGET_BUCKET = 16
GATHER_S = 0.005  # how long the worker waits for requests that arrive together


class RequestError(ValueError):
    """A request that cannot be served as asked: HTTP 400, OpenAI-style, naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass
class Update:
    """What the worker hands a row's sink: new token ids (the stop token left out) and, once
    the row is done, why ('stop': a stop token, 'length': max_tokens); or the error that
    failed its batch."""
    ids: list[int]
    finish: str | None = None
    error: BaseException | None = None


@dataclasses.dataclass
class Row:
    """One choice of one request. `sink` is called on the worker thread."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    choice: int  # the row samples with fold_in(key(seed), choice)
    sink: Callable[[Update], None]
    cancelled: bool = False

    def cancel(self) -> None:
        """No more tokens for this row; it stops at the next chunk (or is never decoded)."""
        self.cancelled = True


def buckets(smallest: int, limit: int) -> tuple[int, ...]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (limit,)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size that holds n."""
    return next(size for size in sizes if size >= n)


@jax.jit
def _row_keys(seeds, choices):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, choices)


class BatchingGenerator:
    """A worker thread that decodes waiting rows together (see the module docstring)."""

    def __init__(self, params, cfg: LlamaConfig, vocab, max_batch_size: int = 8,
                 max_prompt_len: int = 1024, max_tokens_limit: int = 1024,
                 chunk_tokens: int = 16):
        for name, value in (("max_batch_size", max_batch_size), ("max_prompt_len",
                            max_prompt_len), ("max_tokens_limit", max_tokens_limit),
                            ("chunk_tokens", chunk_tokens)):
            if value < 1:
                raise ConfigError(f"{name}={value}: must be at least 1")
        self.params, self.cfg, self.vocab = params, cfg, vocab
        self.max_batch_size, self.chunk_tokens = max_batch_size, chunk_tokens
        self.max_prompt_len, self.max_tokens_limit = max_prompt_len, max_tokens_limit
        # Buckets stop where the context does: a longer prompt or budget is refused anyway.
        self.prompt_buckets = buckets(SMALLEST_PROMPT_BUCKET,
                                      min(max_prompt_len, cfg.max_seq_len - 1))
        self.budget_buckets = buckets(SMALLEST_BUDGET_BUCKET,
                                      min(max_tokens_limit, cfg.max_seq_len - 1))
        self.batches_run = 0
        self._queue: queue.Queue[Row] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="generator")
        self._thread.start()

    @property
    def program_bound(self) -> int:
        """The most programs this generator can compile (prefill and chunk per bucket pair
        and sampling mode)."""
        return 2 * len(sampling.MODES) * len(self.prompt_buckets) * len(self.budget_buckets)

    def check(self, prompt_len: int, max_tokens: int, prompt_param: str) -> None:
        """Refuses what could otherwise fail a whole batch, naming the limit."""
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens={max_tokens} is over this server's limit of "
                               f"{self.max_tokens_limit}", "max_tokens")
        if prompt_len + max_tokens > self.cfg.max_seq_len:
            raise RequestError(
                f"this model's maximum context length is {self.cfg.max_seq_len} tokens "
                f"(max_seq_len), but the request needs {prompt_len + max_tokens}: "
                f"{prompt_len} in the prompt plus max_tokens={max_tokens}; shorten the "
                f"prompt or lower max_tokens", prompt_param, "context_length_exceeded")
        if prompt_len > self.max_prompt_len:
            raise RequestError(f"the prompt has {prompt_len} tokens; this server's limit is "
                               f"{self.max_prompt_len}", prompt_param)

    def submit(self, rows: Sequence[Row], prompt_param: str) -> None:
        """Queues a request's rows after checking them."""
        for row in rows:
            self.check(len(row.prompt_ids), row.max_tokens, prompt_param)
        for row in rows:
            self._queue.put(row)

    def warm_up(self, prompt_lens: Sequence[int], max_tokens: Sequence[int],
                modes: Sequence[str] = ("greedy", "sample")) -> int:
        """Compiles the programs of every pair of buckets holding these prompt lengths and
        max_tokens, in each sampling mode, so the first such request does not wait; returns
        how many programs that compiled."""
        unknown = sorted(set(modes) - set(sampling.MODES))
        if unknown:
            raise ConfigError(f"warm-up modes {unknown}: choose from {sampling.MODES}")

        def holding(sizes, lengths):
            return sorted({bucket(min(n, sizes[-1]), sizes) for n in lengths})

        before = sampling.stream_program_count()
        _row_keys(*np.zeros((2, self.max_batch_size), np.uint32))
        for width in holding(self.prompt_buckets, prompt_lens):
            for budget in holding(self.budget_buckets, max_tokens):
                for mode in modes:
                    sampling.compile_stream(
                        self.params, self.cfg, self.max_batch_size, width, budget, mode,
                        stop_ids=(self.vocab.eos_id,), pad_id=self.vocab.pad_id,
                        chunk_tokens=self.chunk_tokens)
        return sampling.stream_program_count() - before

    def _run(self):
        while True:
            rows = [self._queue.get()]
            time.sleep(GATHER_S)
            while len(rows) < self.max_batch_size:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [row for row in rows if not row.cancelled]
            if rows:
                self._decode(rows)

    def _decode(self, rows: list[Row]):
        sent = [0] * len(rows)  # tokens handed to each row so far
        active = set(range(len(rows)))
        try:  # rows were checked at submit; anything failing here fails its batch (500)
            padded = rows + [rows[-1]] * (self.max_batch_size - len(rows))  # one batch shape
            width = bucket(max(len(row.prompt_ids) for row in rows), self.prompt_buckets)
            budget = bucket(max(row.max_tokens for row in rows), self.budget_buckets)
            batch = converters.left_padded_batch([row.prompt_ids for row in padded], width,
                                                 self.vocab.pad_id)
            # Each row samples with its own request's seed, whoever shares its batch.
            keys = _row_keys(np.asarray([row.seed for row in padded], np.uint32),
                             np.asarray([row.choice for row in padded], np.uint32))
            for partial in sampling.stream(
                    self.params, self.cfg, batch["tokens"], batch["mask"], keys,
                    max_new_tokens=budget,
                    temperature=[row.temperature for row in padded],
                    top_k=[row.top_k for row in padded], top_p=[row.top_p for row in padded],
                    stop_ids=(self.vocab.eos_id,), pad_id=self.vocab.pad_id,
                    chunk_tokens=self.chunk_tokens):
                for r in sorted(active):
                    sent[r] = _deliver(rows[r], partial, r, sent[r])
                    if sent[r] is None:
                        active.discard(r)
                if not active:
                    break
            self.batches_run += 1
        except Exception as err:  # report to every waiting row, keep serving
            for r in active:
                rows[r].sink(Update([], error=err))


def _deliver(row: Row, partial: sampling.Generation, r: int, sent: int) -> int | None:
    """Hands row its tokens beyond the first `sent`; the new count, or None once it is done."""
    if row.cancelled:
        return None
    n = int(partial.lengths[r])
    stopped = bool(partial.finished[r]) and n <= row.max_tokens
    end = min(n - 1 if stopped else n, row.max_tokens)
    finish = "stop" if stopped else "length" if end >= row.max_tokens else None
    if end > sent or finish:
        row.sink(Update(partial.tokens[r, sent:end].tolist(), finish))
    return None if finish else end
