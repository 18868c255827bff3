"""Packed, per-host, resumable SFT batches from a seqio task or mixture (tasks.py registers
them), beside sft_data.SftData, which reads files into memory.

    tasks.register_sft_task("my_sft", {"train": ["sharegpt.jsonl"]}, max_len=2049)
    data = SeqioSftData("my_sft", seq_len=2048, batch_size=64, num_shards=8)
    for batch in data.batches(start_step):   # this host's rows of the global batch
        ...

The task's examples are already tokenized (at registration, or when prepared as TFDS data):
the vocabulary here only gives the pad id and the model's vocabulary check, and must be the
one the task was tokenized with, which nothing here can verify. Like SftData it may be bound
later (`vocabulary=None`, then `data.with_vocabulary(vocab)`: batching.LazyVocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from xwin_jax.data import packing
from xwin_jax.data.batching import GlobalBatches, LazyVocabulary
from xwin_jax.data.tasks import FEATURES
from xwin_jax.errors import ConfigError


@dataclasses.dataclass
class SeqioSftData(LazyVocabulary, GlobalBatches):
    """Packed SFT batches from a seqio task or mixture, read as `num_shards` data shards.

    Shard s packs its own examples into rows [s*R, (s+1)*R) of every global batch
    (R = batch_size / num_shards); each host reads the contiguous shards whose rows it feeds.
    With num_shards fixed, batch k is a pure function of (task, seed, num_shards, k) on any
    number of hosts: two hosts reading one shard each and one host reading both build the
    same global batches, so a run can resume on a different host count. None = one shard
    per host, which ties the data order to the host count.
    """
    task: str
    seq_len: int
    batch_size: int
    split: str = "train"
    seed: int = 0
    # The task's vocabulary (for pad_id and the model's vocab check): a Vocabulary, 'bytes'
    # or a tokenizer path; None: bound by the job.
    vocabulary: Any = None
    num_shards: int | None = None

    def __post_init__(self):
        if self.num_shards is not None and self.num_shards < 1:
            raise ConfigError(f"SeqioSftData.num_shards={self.num_shards}: use a count >= 1, "
                              f"or None for one shard per host")
        self._streams = None
        self._next_step = None
        self._bind_given()

    def _tokenize(self, vocab) -> None:
        # Nothing to tokenize (the task's examples are); a copy bound anew streams anew.
        self._streams = None
        self._next_step = None

    def report(self) -> str:
        unbound = "" if self.has_vocabulary else " (no vocabulary yet)"
        return (f"seqio {self.task!r} split {self.split!r}, seed {self.seed}, "
                f"{self._shard_count()} data shards{unbound}")

    def fingerprint(self) -> dict[str, Any]:
        """What determines the batches: the task or mixture by name, split, seed, the number of
        data shards (None counted as the host count it stands for), row and batch sizes, and
        the bound vocabulary (None while unbound). A seqio task has no files here to digest:
        its name is its identity, so a task re-registered under the same name over other
        data, or a TFDS dataset prepared anew under the same name, is not told apart."""
        return {"type": type(self).__name__, "task": self.task, "split": self.split,
                "seed": self.seed, "num_shards": self._shard_count(), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "vocabulary": self.vocabulary_fingerprint()}

    def _shard_count(self) -> int:
        return self.num_shards or jax.process_count()

    def host_shards(self) -> range:
        """The data shards this host reads, in the order of its rows."""
        shards, hosts = self._shard_count(), jax.process_count()
        if shards % hosts:
            raise ConfigError(f"num_shards={shards} does not split over {hosts} hosts")
        if self.batch_size % shards:
            raise ConfigError(f"batch_size={self.batch_size} does not split into "
                              f"{shards} data shards")
        per_host = shards // hosts
        return range(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)

    def _examples(self, shard: int):
        import seqio
        task = seqio.get_mixture_or_task(self.task)
        length = {name: self.seq_len + 1 for name in FEATURES}
        # No silent trimming: a cut conversation would lose its </s> and skip the template's
        # truncation policy, which the task applies when registered with max_len.
        dataset = task.get_dataset(length, split=self.split, shuffle=True, seed=self.seed,
                                   shard_info=seqio.ShardInfo(shard, self._shard_count()),
                                   num_epochs=None, trim_output_features=False)
        for example in dataset.as_numpy_iterator():
            if len(example["ids"]) > self.seq_len + 1:
                raise ConfigError(
                    f"seqio task {self.task!r} has an example of {len(example['ids'])} tokens; "
                    f"register or prepare it with max_len <= seq_len + 1 = {self.seq_len + 1}")
            yield example["ids"], example["loss_mask"]

    def _rows(self, shard: int):
        """Packed rows of one data shard, forever, in a fixed order."""
        pending, length = [], 0
        for ids, mask in self._examples(shard):
            pending.append((ids, mask))
            length += len(ids) - 1
            if length >= 8 * self.seq_len:  # pack a few rows' worth at a time
                packed = packing.pack_examples(pending, self.seq_len, self.vocab.pad_id)
                for r in range(len(packed["input_tokens"]) - 1):  # the last may still fill up
                    yield {k: v[r] for k, v in packed.items()}
                last = len(packed["input_tokens"]) - 1
                pending = [e for e, s in zip(pending, _segment_rows(packed, len(pending)))
                           if s == last]
                length = sum(len(e[0]) - 1 for e in pending)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        self.vocab  # noqa: B018  (unbound: fail now, not after seqio has loaded the task)
        shards = self.host_shards()
        per_shard = self.batch_size // self._shard_count()
        if self._streams is None or self._next_step != step:
            self._streams = [self._rows(shard) for shard in shards]
            for stream in self._streams:
                for _ in range(step * per_shard):  # replay to the resumed step
                    next(stream)
            self._next_step = step
        rows = [next(stream) for stream in self._streams for _ in range(per_shard)]
        self._next_step += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        if jax.process_count() != 1:
            raise ConfigError("global_batch needs every host's shard; use local_batch")
        return self.local_batch(step)


def _segment_rows(packed: Mapping[str, np.ndarray], count: int) -> list[int]:
    """The row each of the `count` packed examples went to, in order."""
    rows = []
    for r, segments in enumerate(packed["segment_ids"]):
        rows += [r] * int(segments.max())
    assert len(rows) == count, (len(rows), count)
    return rows
