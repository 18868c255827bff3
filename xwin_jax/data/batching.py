"""What every batch source shares: global batch k is a pure function of k; each host takes
its own rows; `batches(start_step)` is what the training loop iterates (and resumes) with.

Data read from files is tokenized only once a vocabulary is bound (`LazyVocabulary`): gin
builds the data objects before the job runs, and the job binds the vocabulary of its input
checkpoint with `data.with_vocabulary(vocab)`, unless the data was given one explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError


class GlobalBatches:
    """Subclasses set `batch_size` and define `global_batch(step)`."""
    batch_size: int

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `step`."""
        count, index = jax.process_count(), jax.process_index()
        if self.batch_size % count:
            raise ConfigError(f"batch_size={self.batch_size} does not split over {count} hosts")
        rows = self.batch_size // count
        return {k: v[index * rows:(index + 1) * rows]
                for k, v in self.global_batch(step).items()}

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            yield self.local_batch(step)
            step += 1


class LazyVocabulary:
    """Inputs read (and validated) at construction, tokenized once a vocabulary is bound.

    A subclass is a dataclass with a `vocabulary` field (None: bind later). Its __post_init__
    reads its inputs, then calls `self._bind_given()`, which tokenizes at once when
    `vocabulary` was given. `_tokenize(vocab)` computes what depends on the vocabulary and
    sets the attributes named in BOUND; until then those and `vocab` raise ConfigError.
    """
    BOUND: tuple[str, ...] = ()
    vocabulary: Any

    def _tokenize(self, vocab) -> None:
        raise NotImplementedError

    def _bind_given(self) -> None:
        if self.vocabulary is not None:
            self._bind(get_vocabulary(self.vocabulary))

    def _bind(self, vocab) -> None:
        self._tokenize(vocab)
        self.vocab = vocab

    @property
    def has_vocabulary(self) -> bool:
        return "vocab" in self.__dict__

    def with_vocabulary(self, vocabulary):
        """This data bound to `vocabulary` (a Vocabulary, 'bytes' or a tokenizer path): self if
        it already is, else a copy tokenized with it from the records already read (no file is
        read again). A copy bound to another vocabulary than the one given at construction is
        tokenized anew: deciding whether that is allowed is the caller's business."""
        vocab = get_vocabulary(vocabulary)
        if self.has_vocabulary and self.vocab == vocab:
            return self
        bound = copy.copy(self)
        for name in ("vocab", *self.BOUND):
            bound.__dict__.pop(name, None)
        bound.vocabulary = vocabulary
        bound._bind(vocab)
        return bound

    def vocabulary_fingerprint(self) -> Any:
        """The bound vocabulary's fingerprint(), None while unbound."""
        return self.vocab.fingerprint() if self.has_vocabulary else None

    def fingerprint(self) -> dict[str, Any]:
        """What determines the batches: the contents of the files as read (`file_identities`:
        size and sha256, not their paths), every other field, and the bound vocabulary (None
        while unbound)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("paths", "vocabulary")}
        return {"type": type(self).__name__, "files": list(self.file_identities), **fields,
                "vocabulary": self.vocabulary_fingerprint()}

    def __getattr__(self, name: str):
        # Only reached for attributes not set: the tokenized ones of an unbound object.
        if name == "vocab" or name in type(self).BOUND:
            raise ConfigError(
                f"{type(self).__name__}.{name}: the data has no vocabulary yet (vocabulary="
                f"None: the job binds its input checkpoint's, data.with_vocabulary(vocab))",
                hint="give the data a vocabulary ('bytes' or a tokenizer path) or bind one "
                     "with with_vocabulary() before reading batches")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
