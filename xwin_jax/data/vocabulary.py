"""Vocabularies: bytes for the offline default, SentencePiece for Llama's tokenizer.model.

Both follow Llama's special ids (BOS 1, EOS 2) and keep pad (0) distinct from EOS, so EOS is
never masked out as padding.
"""

from __future__ import annotations

import os
from typing import Sequence

from xwin_jax.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteVocabulary:
    """UTF-8 bytes: byte b is id b + 3; 0 pad, 1 BOS, 2 EOS. 259 ids."""
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    offset = 3
    vocab_size = 256 + 3
    # Encoding "x" yields exactly the bytes of "x": a leading space must be written out.
    space_prefix = False

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __eq__(self, other):
        return isinstance(other, ByteVocabulary)

    def __hash__(self):
        return hash(ByteVocabulary)


class SentencePieceVocabulary:
    """A SentencePiece model (e.g. Llama's tokenizer.model). Its unk id (0) doubles as pad."""
    # SentencePiece's dummy prefix: encoding "x" yields "▁x", i.e. the text " x".
    space_prefix = True

    def __init__(self, model_file: str):
        import sentencepiece

        self.model_file = model_file
        if not os.path.isfile(model_file):
            raise ConfigError(f"VOCABULARY={model_file!r}: no such file",
                              hint="give 'bytes' or the path of a SentencePiece "
                                   "tokenizer.model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"VOCABULARY={model_file!r}: not a SentencePiece model "
                              f"({err})") from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        if self.pad_id == self.eos_id:
            raise ConfigError(f"{model_file}: pad id equals EOS id {self.eos_id}: EOS would be "
                              f"masked out as padding")
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i not in (self.pad_id,)])

    def __eq__(self, other):
        return isinstance(other, SentencePieceVocabulary) and other.model_file == self.model_file

    def __hash__(self):
        return hash(self.model_file)


def get_vocabulary(spec: str) -> ByteVocabulary | SentencePieceVocabulary:
    """'bytes' or a path to a SentencePiece model."""
    return ByteVocabulary() if spec == "bytes" else SentencePieceVocabulary(spec)
