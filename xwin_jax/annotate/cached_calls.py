"""Paid judge calls, each made once: a cache appended (and fsynced) per answer, calls run
concurrently, a fatal error stopping what is not yet sent.

    done = judge_cached(keys, call, cache_path, concurrency=8, stop_event=judge.stop_event)
    done.records[i]    # the cached record of item i ({"key": keys[i], **call(i)}), or None
    done.unusable      # {i: UnusableReply} for the items whose replies held nothing usable

The loop of every judging job (annotate/pairs.py `judge_pairs`, evaluate, MT-Bench): items
whose key is in the cache are not asked again (a killed run resumes without paying twice, and
items with the same key are asked once); an item whose call raises UnusableReply is left out
of the cache (a rerun asks again for it); any other error (JudgeError: refused, unreachable;
Ctrl-C) stops the work — requests in flight finish and are cached, the rest are not sent —
and a JudgeError says how many items are cached and that the same command resumes.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, NamedTuple, Sequence

from tqdm import tqdm

from xwin_jax.annotate.judge import JudgeError, UnusableReply
from xwin_jax.data import formats


class CachedCalls(NamedTuple):
    """What judge_cached returns: a record per item (None where unusable) and the
    UnusableReply of each unusable item, by the index of the first item with its key."""
    records: list[dict | None]
    unusable: dict[int, UnusableReply]


def read_cache(path: str) -> dict[str, dict]:
    """Cached records by key; a line cut off by a kill is dropped (its item is asked
    again)."""
    return formats.read_appended_jsonl(path, "key")


def judge_cached(keys: Sequence[str], call: Callable[[int], dict], cache_path: str, *,
                 concurrency: int = 8, stop_event: threading.Event | None = None,
                 what: str = "items", desc: str = "judge") -> CachedCalls:
    """call(i) → the record to cache for item i (JSON; stored as {"key": keys[i], ...}), for
    every item whose key is not in `cache_path`, `concurrency` calls at a time (see the
    module docstring). `stop_event` (the judge's): set when the work stops, so that a call
    waiting to retry gives up at once; cleared at the end (the judge is reusable). `what`
    names the items in the JudgeError's message."""
    cache = read_cache(cache_path)
    lock = threading.Lock()
    # The first item of each key not yet cached, in item order: one call per key.
    todo = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in cache}.values())
    unusable: dict[int, UnusableReply] = {}
    stop = threading.Event()  # set by the first failure: what is not yet sent, is not sent
    stop_event = stop_event if stop_event is not None else threading.Event()

    def run_one(index: int) -> None:
        if stop.is_set():
            return
        try:
            value = call(index)
        except UnusableReply as err:
            with lock:
                unusable[index] = err
            return
        except BaseException:
            stop.set()
            raise
        record = {"key": keys[index], **value}
        with lock:
            cache[keys[index]] = record
            formats.append_jsonl(cache_path, [record])  # synced: a kill loses no paid answer

    pool = ThreadPoolExecutor(max(1, concurrency))
    futures = [pool.submit(run_one, i) for i in todo]
    with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=desc) as bar:
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or bar.update(1))
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and not f.cancelled()
                           and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
        except BaseException as err:
            stop.set()
            stop_event.set()  # retries give up now
            for future in futures:
                future.cancel()  # not yet sent: never sent; in flight: finishes, is cached
            pool.shutdown(wait=True)
            if isinstance(err, JudgeError):
                cached = sum(k in cache for k in keys)
                raise JudgeError(f"{err}. {cached} of {len(keys)} {what} are judged and cached "
                                 f"in {cache_path}; the same command resumes from there",
                                 hint=err.hint) from err
            raise
        finally:
            pool.shutdown(wait=True)
            stop_event.clear()  # the judge is reusable
    return CachedCalls([cache.get(k) for k in keys], dict(sorted(unusable.items())))

