"""Packed SFT batches from conversation files, deterministic and resumable.

    data = SftData(["sharegpt.jsonl"], seq_len=2048, batch_size=64, vocabulary="bytes")
    for batch in data.batches(start_step):   # process-local rows of the global batch
        ...

Conversations are read (formats.py) at construction, so a malformed file fails at once, naming
file:line. They are tokenized with the Xwin template (template.py) once a vocabulary is bound:
at construction when `vocabulary` is given, else when the job binds its checkpoint's
(`data.with_vocabulary(vocab)`, batching.LazyVocabulary). Then each epoch is a seeded
permutation of the examples packed into rows. Batch k of the run is a pure function of
(files, vocabulary, seed, k), so `batches(start_step)` resumes exactly where a killed run
stopped; each host takes its own rows.

`tokenized_examples` is the same tokenization streamed from files, for the seqio tasks
(tasks.py) and the TFDS builder (tfds_builder.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from xwin_jax.data import formats, packing, template
from xwin_jax.data.batching import GlobalBatches, LazyVocabulary
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.fingerprint import file_identity


def tokenize_conversations(conversations: Iterable[formats.Conversation], vocab,
                           max_len: int | None, system: str | None, truncation: str,
                           stats: template.TruncationStats | None = None
                           ) -> Iterator[template.Tokenized]:
    """The Xwin-template tokenization of every conversation that keeps an answer token, in
    order; `stats` counts the shortened and dropped ones."""
    for conversation in conversations:
        tokenized = template.tokenize_conversation(conversation, vocab, max_len, system,
                                                   truncation)
        if stats is not None:
            stats.add(tokenized)
        if tokenized is not None:
            yield tokenized


def tokenized_examples(paths: Sequence[str], vocabulary: Any, max_len: int | None,
                       system: str | None, truncation: str, skip_invalid: bool):
    """(ids, loss_mask) int32 arrays for every usable conversation of the files, in file
    order. `vocabulary`: a Vocabulary, 'bytes' or a tokenizer path."""
    vocab = get_vocabulary(vocabulary)
    for path in paths:
        for tokenized in tokenize_conversations(
                formats.read_sft(path, skip_invalid=skip_invalid), vocab, max_len, system,
                truncation):
            yield (np.asarray(tokenized.ids, np.int32),
                   np.asarray(tokenized.loss_mask, np.int32))


@dataclasses.dataclass
class SftData(LazyVocabulary, GlobalBatches):
    paths: Sequence[str]
    seq_len: int
    batch_size: int
    # A Vocabulary, 'bytes' or a tokenizer path; None: tokenized once the job binds one.
    vocabulary: Any = None
    seed: int = 0
    system: str | None = None
    truncation: str = "drop_turns"
    skip_invalid: bool = False

    BOUND = ("examples", "stats")

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.truncation not in template.TRUNCATION_POLICIES:
            raise ConfigError(f"truncation={self.truncation!r}: choose one of "
                              f"{template.TRUNCATION_POLICIES}")
        self.conversations: list[formats.Conversation] = []
        self.skipped = []
        self.file_identities = []  # of what was read: a file rewritten later is not this data
        for path in self.paths:
            result = formats.read_sft(path, skip_invalid=self.skip_invalid)
            self.file_identities.append(file_identity(path))
            self.skipped += result.skipped
            self.conversations += result.records
        if not self.conversations:
            raise ConfigError(f"{list(self.paths)}: no SFT conversations")
        self._epochs: dict[int, dict[str, np.ndarray]] = {}
        self._batch_counts: dict[int, int] = {}
        self._bind_given()

    def _tokenize(self, vocab) -> None:
        stats = template.TruncationStats()
        examples = [(t.ids, t.loss_mask) for t in tokenize_conversations(
            self.conversations, vocab, self.seq_len + 1, self.system, self.truncation, stats)]
        if not examples:
            raise ConfigError(f"{list(self.paths)}: no usable SFT examples ({stats.report()};"
                              f" is seq_len={self.seq_len} shorter than the chat template?)")
        self.examples, self.stats = examples, stats
        self._epochs, self._batch_counts = {}, {}  # a copy bound anew packs anew

    def report(self) -> str:
        skipped = f", {len(self.skipped)} invalid records skipped" if self.skipped else ""
        if not self.has_vocabulary:
            return f"{len(self.conversations)} SFT conversations (no vocabulary yet{skipped})"
        return f"{len(self.examples)} SFT examples ({self.stats.report()}{skipped})"

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """All packed rows of one epoch (cached: the last two epochs)."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._epochs[epoch] = packing.pack_examples([self.examples[i] for i in order],
                                                        self.seq_len, self.vocab.pad_id)
            for old in [e for e in self._epochs if e < epoch - 1]:
                del self._epochs[old]
        return self._epochs[epoch]

    def epoch_batches(self, epoch: int) -> int:
        """Whole batches in an epoch (each epoch packs differently; its remainder is unused)."""
        if epoch not in self._batch_counts:
            self._batch_counts[epoch] = len(self.epoch_rows(epoch)["input_tokens"]) // \
                self.batch_size
            if self._batch_counts[epoch] == 0:
                raise ConfigError(f"an epoch packs into fewer rows than batch_size="
                                  f"{self.batch_size}")
        return self._batch_counts[epoch]

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = 0, step
        while index >= self.epoch_batches(epoch):
            index -= self.epoch_batches(epoch)
            epoch += 1
        rows = self.epoch_rows(epoch)
        span = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return {k: v[span] for k, v in rows.items()}
