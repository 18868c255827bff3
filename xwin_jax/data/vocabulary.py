"""Vocabularies, and the tokenizer files that travel with every checkpoint.

Three kinds, all with `kind`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `space_prefix`,
`encode` (never adds BOS/EOS: the chat template does), `decode`, `fingerprint()` and
`save(directory)`; two vocabularies are equal when their contents are (never their paths):

- `ByteVocabulary`: UTF-8 bytes, byte b is id b + 3; 0 pad, 1 BOS, 2 EOS (the offline default).
- `SentencePieceVocabulary`: a SentencePiece model such as Llama's `tokenizer.model`.
- `HFTokenizerVocabulary`: a Hugging Face fast-tokenizer file (`tokenizer.json`), read with the
  `tokenizers` library; its special ids come from the tokenizer's own config files.

Pad is always distinct from EOS, so EOS is never masked out as padding.

`save(directory)` writes the tokenizer's files (a params checkpoint or an HF export) and
`vocabulary.json`, which records the kind, the files, the special ids and the sha256 of the
tokenizer file. Every kind writes files `transformers.AutoTokenizer.from_pretrained(directory)`
loads with the same ids for ordinary text: the SentencePiece kind adds an equivalent
`tokenizer.json`, the byte kind generates a byte-level one. (One difference is deliberate:
`encode` treats text that spells a special token, "</s>", as text, as SentencePiece does, so
user text cannot inject BOS/EOS; an HF tokenizer matches such text to the special token, which
HF chat templates rely on.) `load_vocabulary(directory)` reads them back;
`resolve_vocabulary` is the rule every job uses to pick its vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any, Sequence

from xwin_jax.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

VOCABULARY_FILE = "vocabulary.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# The tokenizer files of an HF directory (and of a params checkpoint that carries one).
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                   GENERATION_CONFIG)
KINDS = ("bytes", "sentencepiece", "hf_tokenizer")

_SPEC_HINT = ("give 'bytes' or the path of a SentencePiece tokenizer.model, of a "
              "tokenizer.json, or of a directory holding one (a params checkpoint or an HF "
              "model directory)")

# Texts on which a generated tokenizer.json must encode exactly as the SentencePiece model.
_PROBES = ("", "x", "Hello world.", " leading space", "  two leading spaces", "trailing ",
           "a  b   c", "tabs\tand\nnew\nlines\n", "digits 0123456789 and 3.14",
           "Grüße aus Köln, ça va très bien, naïve café", "日本語のテキスト", "emoji 🎉☃ ✓",
           "USER: Hi ASSISTANT: Hello!", "<s> and </s> as text")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class Vocabulary:
    """What the three kinds share. Subclasses set the ids and implement encode/decode,
    `_digest` (the sha256 of the tokenizer file) and `_contents` (the files save writes)."""

    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    space_prefix: bool  # encode("x") already yields the text " x" (SentencePiece's dummy prefix)
    source: str  # what it was built from, for messages

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _digest(self) -> str:
        raise NotImplementedError

    def _contents(self) -> dict[str, bytes]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Kind, special ids, vocab_size and the sha256 of the tokenizer file's contents."""
        return {"kind": self.kind, "vocab_size": int(self.vocab_size),
                "bos_id": int(self.bos_id), "eos_id": int(self.eos_id),
                "pad_id": int(self.pad_id), "sha256": self._digest()}

    def save(self, directory: str) -> list[str]:
        """Writes the tokenizer files and `vocabulary.json` (last) into `directory`; returns
        the names written. `AutoTokenizer.from_pretrained(directory)` then loads a tokenizer
        that encodes ordinary text to the same ids (with add_special_tokens=False)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        contents = self._contents()
        for name, data in contents.items():
            _write(os.path.join(directory, name), data)
        record = dict(self.fingerprint(), space_prefix=bool(self.space_prefix),
                      files=sorted(contents))
        _write(os.path.join(directory, VOCABULARY_FILE), _dump(record))
        return sorted(contents) + [VOCABULARY_FILE]

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self.fingerprint() == other.fingerprint()

    def __hash__(self):
        return hash(json.dumps(self.fingerprint(), sort_keys=True))

    def __repr__(self):
        return f"{type(self).__name__}({self.source!r})"

    def _hf_special_tokens(self, tokens: dict[str, str | None]) -> dict[str, bytes]:
        """special_tokens_map.json for a generated HF tokenizer."""
        return {SPECIAL_TOKENS_MAP: _dump({k: v for k, v in tokens.items() if v is not None})}


# --- bytes ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of byte-level tokenizers."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteVocabulary(Vocabulary):
    """UTF-8 bytes: byte b is id b + 3; 0 pad, 1 BOS, 2 EOS. 259 ids."""
    kind = "bytes"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    offset = 3
    vocab_size = 256 + 3
    # Encoding "x" yields exactly the bytes of "x": a leading space must be written out.
    space_prefix = False
    source = "bytes"
    SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")

    def __repr__(self):
        return "ByteVocabulary()"

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def _digest(self) -> str:
        return _sha256(b"xwin_jax ByteVocabulary: UTF-8 byte b is id b + 3; 0 <pad>, 1 <s>, "
                       b"2 </s>")

    def tokenizer_json(self) -> str:
        """A byte-level BPE with no merges: every byte is one token, with the same ids."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        vocab = {token: i for i, token in enumerate(self.SPECIAL_TOKENS)}
        vocab.update({char: b + self.offset for b, char in bytes_to_unicode().items()})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", self.bos_id)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in self.SPECIAL_TOKENS])
        return tok.to_str(pretty=True)

    def _contents(self) -> dict[str, bytes]:
        pad, bos, eos = self.SPECIAL_TOKENS
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                  "eos_token": eos, "pad_token": pad, "unk_token": None,
                  "add_bos_token": True, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        return {TOKENIZER_JSON: self.tokenizer_json().encode("utf-8"),
                TOKENIZER_CONFIG: _dump(config),
                **self._hf_special_tokens({"bos_token": bos, "eos_token": eos,
                                           "pad_token": pad})}


# --- SentencePiece ----------------------------------------------------------------------------

class SentencePieceVocabulary(Vocabulary):
    """A SentencePiece model (e.g. Llama's tokenizer.model). Without a pad piece its unk id
    doubles as pad."""
    kind = "sentencepiece"
    # SentencePiece's dummy prefix: encoding "x" yields "▁x", i.e. the text " x" (read from
    # the model: False for one trained with add_dummy_prefix=false).
    space_prefix = True

    def __init__(self, model_file: str):
        import sentencepiece

        model_file = os.fspath(model_file)
        self.model_file = self.source = model_file
        if not os.path.isfile(model_file):
            raise ConfigError(f"VOCABULARY={model_file!r}: no such file", hint=_SPEC_HINT)
        self._data = _read_bytes(model_file)  # kept: save() must not depend on the path
        self._sha = _sha256(self._data)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._data)
        except (OSError, RuntimeError, TypeError, ValueError) as err:
            raise ConfigError(f"VOCABULARY={model_file!r}: not a SentencePiece model "
                              f"({str(err).strip()[:200]})") from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(f"{model_file}: the SentencePiece model has no "
                              f"{'BOS' if self.bos_id < 0 else 'EOS'} piece; the chat "
                              f"template needs both")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        if self.pad_id == self.eos_id:
            raise ConfigError(f"{model_file}: pad id equals EOS id {self.eos_id}: EOS would be "
                              f"masked out as padding")
        self.vocab_size = self._sp.get_piece_size()
        pieces = self._sp.encode("a", out_type=str)
        self.space_prefix = bool(pieces) and pieces[0].startswith("▁")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids
                                if i != self.pad_id and 0 <= i < self.vocab_size])

    def _digest(self) -> str:
        return self._sha

    @functools.cached_property
    def hf_tokenizer_json(self) -> str | None:
        """An equivalent tokenizer.json (Llama's legacy conversion: BPE over the pieces with
        byte fallback, the dummy prefix as a normalizer), or None when this model cannot be
        expressed so that it encodes exactly like SentencePiece on a set of probe texts
        (e.g. a unigram model, or one with NFKC normalization or whitespace folding)."""
        try:
            tok = self._build_tokenizer()
            tok.encode_special_tokens = True  # special-token text is text, as in SentencePiece
            if all(tok.encode(text, add_special_tokens=False).ids == self._sp.encode(text)
                   for text in _PROBES):
                return tok.to_str(pretty=True)
        except Exception:  # noqa: BLE001 - any failure: fall back to tokenizer.model only
            pass
        print(f"note: {self.model_file}: this SentencePiece model has no exact tokenizer.json "
              f"equivalent (e.g. it normalizes text, or is a unigram model); saved without "
              f"one, transformers converts tokenizer.model itself and its ids may differ from "
              f"SentencePiece's on some texts")
        return None

    def _build_tokenizer(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

        sp, n = self._sp, self.vocab_size
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        if len(vocab) != n:
            raise ValueError("duplicate pieces")
        special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        mergeable = {sp.id_to_piece(i): i for i in range(n)
                     if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
                             or sp.is_unused(i))}
        # As transformers' SentencePiece extraction: a piece's merges rank by its id (SentencePiece
        # BPE numbers its pieces by score).
        merges = []
        for piece, i in mergeable.items():
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in mergeable and piece[k:] in mergeable]
            splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            merges.extend((i, lr) for lr in splits)
        merges = [lr for _, lr in sorted(merges, key=lambda m: m[0])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                   unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                                   byte_fallback=any(sp.is_byte(i) for i in range(n))))
        prefix = [normalizers.Prepend("▁")] if self.space_prefix else []
        tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if self.space_prefix else []))
        bos = sp.id_to_piece(self.bos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                                for i in special])
        return tok

    def _contents(self) -> dict[str, bytes]:
        sp = self._sp
        tokens = {"bos_token": sp.id_to_piece(self.bos_id),
                  "eos_token": sp.id_to_piece(self.eos_id),
                  "unk_token": sp.id_to_piece(sp.unk_id()),
                  "pad_token": sp.id_to_piece(self.pad_id)}
        contents = {TOKENIZER_MODEL: self._data}
        tokenizer_json = self.hf_tokenizer_json
        if tokenizer_json is not None:
            # transformers loads tokenizer.json as it is (LlamaTokenizer would rebuild it with
            # a Metaspace pre-tokenizer, which encodes leading spaces unlike SentencePiece).
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                      "add_bos_token": True, "add_eos_token": False,
                      "clean_up_tokenization_spaces": False}
            contents[TOKENIZER_JSON] = tokenizer_json.encode("utf-8")
        else:
            config = {"tokenizer_class": "LlamaTokenizer", **tokens, "add_bos_token": True,
                      "add_eos_token": False, "legacy": True,
                      "add_prefix_space": bool(self.space_prefix),
                      "clean_up_tokenization_spaces": False}
        contents[TOKENIZER_CONFIG] = _dump(config)
        contents.update(self._hf_special_tokens(tokens))
        return contents


# --- tokenizer.json ---------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_id(value: Any) -> int | None:
    """An id from generation_config.json / config.json (eos_token_id may be a list)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class HFTokenizerVocabulary(Vocabulary):
    """A Hugging Face fast tokenizer (`tokenizer.json`) through the `tokenizers` library.

    BOS, EOS and pad come from the tokenizer's own config in `config_dir` (default: the
    directory of `tokenizer_json`): `tokenizer_config.json`, then `special_tokens_map.json`
    (their bos_token / eos_token / pad_token, strings or AddedToken dicts), then the ids in
    `generation_config.json` and `config.json`. A pad token equal to EOS in the tokenizer's
    config is refused. Without a pad token, pad is (in this order) a generation_config /
    config pad_token_id that is not EOS, the unk token, or the lowest-id special token that is
    neither BOS nor EOS; a tokenizer with none of these is refused. `fallback_ids`
    ({"bos_id", "eos_id", "pad_id"}, from vocabulary.json) fill in ids no config file names.

    encode never adds BOS/EOS and treats special-token text in its input ("</s>") as text,
    as SentencePiece does, so user text cannot inject control tokens. `save` copies
    tokenizer.json and the config files beside it as they are (tokenizer.model too, where
    present); without a tokenizer_config.json it writes one naming PreTrainedTokenizerFast,
    so AutoTokenizer loads tokenizer.json unchanged."""
    kind = "hf_tokenizer"

    def __init__(self, tokenizer_json: str, config_dir: str | None = None, *,
                 fallback_ids: dict | None = None):
        from tokenizers import Tokenizer

        tokenizer_json = os.fspath(tokenizer_json)
        self.tokenizer_json = self.source = tokenizer_json
        if not os.path.isfile(tokenizer_json):
            raise ConfigError(f"VOCABULARY={tokenizer_json!r}: no such file", hint=_SPEC_HINT)
        data = _read_bytes(tokenizer_json)
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
            self._json = json.loads(data)
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ConfigError(f"VOCABULARY={tokenizer_json!r}: not a Hugging Face tokenizer.json "
                              f"({str(err).strip()[:200]})") from None
        self.config_dir = os.fspath(config_dir) if config_dir is not None else (
            os.path.dirname(os.path.abspath(tokenizer_json)))
        self._files = {TOKENIZER_JSON: data}
        self._sha = _sha256(data)
        configs = {}
        for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG, "config.json"):
            path = os.path.join(self.config_dir, name)
            if os.path.isfile(path):
                configs[name] = (path, _read_json(path))
                if name != "config.json":
                    self._files[name] = _read_bytes(path)
        if os.path.isfile(os.path.join(self.config_dir, TOKENIZER_MODEL)):
            # Travels along for slow/SentencePiece users; not what this vocabulary encodes with.
            self._files[TOKENIZER_MODEL] = _read_bytes(os.path.join(self.config_dir,
                                                                    TOKENIZER_MODEL))
        self._configs = configs
        self._tok.encode_special_tokens = True
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self._resolve_special_ids(dict(fallback_ids or {}))
        self.space_prefix = self._detect_space_prefix()

    def _token_id(self, path: str, field: str, content: str) -> int:
        token_id = self._tok.token_to_id(content)
        if token_id is None:
            raise ConfigError(f"{path}: {field} {content!r} is not a token of "
                              f"{self.tokenizer_json}")
        return token_id

    def _from_token_configs(self, name: str) -> tuple[int | None, str | None, str | None]:
        """(id, file, token) of `<name>_token` in tokenizer_config / special_tokens_map."""
        for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
            if file in self._configs:
                path, config = self._configs[file]
                content = _token_content(config.get(f"{name}_token"))
                if content is not None:
                    return self._token_id(path, f"{name}_token", content), path, content
        return None, None, None

    def _from_id_configs(self, name: str) -> tuple[int | None, str | None]:
        for file in (GENERATION_CONFIG, "config.json"):
            if file in self._configs:
                path, config = self._configs[file]
                value = _first_id(config.get(f"{name}_token_id"))
                if value is not None:
                    if not 0 <= value < self.vocab_size:
                        raise ConfigError(f"{path}: {name}_token_id {value} is outside "
                                          f"{self.tokenizer_json}'s {self.vocab_size} ids")
                    return value, path
        return None, None

    def _resolve_special_ids(self, fallback: dict) -> None:
        where = (f"{self.tokenizer_json} (looked in {TOKENIZER_CONFIG}, {SPECIAL_TOKENS_MAP}, "
                 f"{GENERATION_CONFIG} and config.json in {self.config_dir})")
        ids = {}
        for name in ("bos", "eos"):
            token_id, _, _ = self._from_token_configs(name)
            if token_id is None:
                token_id, _ = self._from_id_configs(name)
            if token_id is None:
                token_id = fallback.get(f"{name}_id")
            if token_id is None:
                raise ConfigError(f"{where}: no {name.upper()} token; the chat template needs "
                                  f"BOS and EOS",
                                  hint=f"set {name}_token in {TOKENIZER_CONFIG}")
            ids[name] = token_id
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        pad, path, content = self._from_token_configs("pad")
        if pad is not None and pad == self.eos_id:
            raise ConfigError(f"{path}: pad_token {content!r} is the EOS token (id {pad}): EOS "
                              f"would be masked out as padding",
                              hint=f"set pad_token in {path} to another token (e.g. the unk "
                                   f"token) or remove it (pad then defaults to unk)")
        if pad is None:  # generation_config often sets pad = EOS for HF generate: skip that
            candidate, _ = self._from_id_configs("pad")
            if candidate is not None and candidate != self.eos_id:
                pad = candidate
        if pad is None and fallback.get("pad_id") not in (None, self.eos_id):
            pad = fallback["pad_id"]
        if pad is None:
            unk = self._unk_id()
            if unk is not None and unk != self.eos_id:
                pad = unk
        if pad is None:
            specials = sorted(t["id"] for t in self._json.get("added_tokens", [])
                              if t.get("special") and t["id"] not in (self.bos_id, self.eos_id))
            pad = specials[0] if specials else None
        if pad is None:
            raise ConfigError(f"{where}: no pad token, and no unk or other special token that "
                              f"is not EOS to pad with (pad must differ from EOS, or EOS "
                              f"would be masked out as padding)",
                              hint=f"add a pad token to the tokenizer and set pad_token in "
                                   f"{TOKENIZER_CONFIG}")
        self.pad_id = pad

    def _unk_id(self) -> int | None:
        model = self._json.get("model", {})
        for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
            if file in self._configs:
                content = _token_content(self._configs[file][1].get("unk_token"))
                if content is not None and self._tok.token_to_id(content) is not None:
                    return self._tok.token_to_id(content)
        if isinstance(model.get("unk_token"), str):
            return self._tok.token_to_id(model["unk_token"])
        if isinstance(model.get("unk_id"), int):
            return model["unk_id"]
        return None

    def _detect_space_prefix(self) -> bool:
        """Whether encode("a") already starts with a space: a Metaspace prepend (Llama), a
        Prepend("▁") normalizer (Llama's legacy conversion) or ByteLevel add_prefix_space."""
        text = "a"
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        if self._tok.pre_tokenizer is not None:
            text = "".join(piece for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(text))
        return text[:1] in ("▁", "Ġ", " ")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids
                                 if i != self.pad_id and 0 <= i < self.vocab_size],
                                skip_special_tokens=True)

    def _digest(self) -> str:
        return self._sha

    def _contents(self) -> dict[str, bytes]:
        contents = dict(self._files)
        if TOKENIZER_CONFIG not in contents:
            # Without one, AutoTokenizer on an export (config.json says llama) would pick
            # LlamaTokenizer, which rebuilds the tokenizer with its own pre-tokenizer.
            token = self._tok.id_to_token
            tokens = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id),
                      "pad_token": token(self.pad_id)}
            contents[TOKENIZER_CONFIG] = _dump(
                {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                 "clean_up_tokenization_spaces": False})
            contents.setdefault(SPECIAL_TOKENS_MAP, self._hf_special_tokens(tokens)[
                SPECIAL_TOKENS_MAP])
        return contents


# --- finding, loading and choosing ------------------------------------------------------------

def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the TOKENIZER_FILES present in src_dir into dst_dir; returns their names."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if os.path.isfile(src):
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def _from_record(directory: str, record_path: str) -> Vocabulary:
    record = _read_json(record_path)
    kind = record.get("kind")
    if kind == "bytes":
        vocab: Vocabulary = ByteVocabulary()
    elif kind == "sentencepiece":
        vocab = SentencePieceVocabulary(os.path.join(directory, TOKENIZER_MODEL))
    elif kind == "hf_tokenizer":
        fallback = {k: record[k] for k in ("bos_id", "eos_id", "pad_id")
                    if isinstance(record.get(k), int)}
        vocab = HFTokenizerVocabulary(os.path.join(directory, TOKENIZER_JSON), directory,
                                      fallback_ids=fallback)
    else:
        raise ConfigError(f"{record_path}: kind={kind!r}: expected one of {list(KINDS)}")
    actual = vocab.fingerprint()
    changed = [f"{k} {record[k]!r} (the files give {actual[k]!r})" for k in actual
               if k in record and record[k] != actual[k]]
    if changed:
        raise ConfigError(f"{record_path}: records {', '.join(changed)}: the tokenizer files "
                          f"in {directory} changed after it was written",
                          hint="restore them, or delete vocabulary.json to read the files as "
                               "they are now")
    return vocab


def load_vocabulary(directory: str) -> Vocabulary | None:
    """The vocabulary a directory (params checkpoint or HF model directory) holds: from
    vocabulary.json when present, else tokenizer.json (preferred) or tokenizer.model; None
    when it holds no tokenizer."""
    directory = os.fspath(directory)
    record = os.path.join(directory, VOCABULARY_FILE)
    if os.path.isfile(record):
        return _from_record(directory, record)
    if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
        return HFTokenizerVocabulary(os.path.join(directory, TOKENIZER_JSON), directory)
    if os.path.isfile(os.path.join(directory, TOKENIZER_MODEL)):
        return SentencePieceVocabulary(os.path.join(directory, TOKENIZER_MODEL))
    return None


def get_vocabulary(spec: Any) -> Vocabulary:
    """A Vocabulary (as is), 'bytes', the path of a SentencePiece model or of a
    tokenizer.json, or a directory holding a tokenizer (see load_vocabulary)."""
    if isinstance(spec, Vocabulary):
        return spec
    if spec == "bytes":
        return ByteVocabulary()
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise ConfigError(f"VOCABULARY={spec!r}: expected 'bytes' or a path", hint=_SPEC_HINT)
    path = os.fspath(spec)
    if os.path.isdir(path):
        vocab = load_vocabulary(path)
        if vocab is None:
            raise ConfigError(f"VOCABULARY={path!r}: the directory holds no tokenizer (looked "
                              f"for {VOCABULARY_FILE}, {TOKENIZER_JSON} and {TOKENIZER_MODEL})",
                              hint=_SPEC_HINT)
        return vocab
    if not os.path.exists(path):
        raise ConfigError(f"VOCABULARY={path!r}: no such file or directory", hint=_SPEC_HINT)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.endswith(".json") or head.startswith(b"{"):
        return HFTokenizerVocabulary(path)
    return SentencePieceVocabulary(path)


def resolve_vocabulary(explicit: Any, recorded: Vocabulary | None, embedding_size: int | None,
                       source: str | None) -> Vocabulary:
    """The vocabulary a job uses. `explicit`: what the user bound (None, a spec or a
    Vocabulary); `recorded`: the checkpoint's (load_vocabulary, maybe None); `embedding_size`:
    the model's vocab_size (or None); `source`: the checkpoint path (None for a random init).

    An explicit vocabulary overrides the recorded one (saying so when they differ); with
    neither, a random init gets ByteVocabulary() and a checkpoint is an error. A vocabulary
    with more ids than the embedding has rows is refused."""
    vocab = get_vocabulary(explicit) if explicit is not None else recorded
    if vocab is None:
        if source is None:
            vocab = ByteVocabulary()
        else:
            raise ConfigError(f"{source} records no vocabulary (written before checkpoints "
                              f"carried their tokenizer); set VOCABULARY to the tokenizer it "
                              f"was trained with", hint=_SPEC_HINT)
    elif explicit is not None and recorded is not None and vocab != recorded:
        print(f"VOCABULARY: using {vocab!r}, not the {recorded!r} that {source} records "
              f"(an explicit VOCABULARY overrides the checkpoint's)")
    if embedding_size is not None and vocab.vocab_size > embedding_size:
        raise ConfigError(f"VOCABULARY {vocab!r} has {vocab.vocab_size} ids but the model's "
                          f"embedding has {embedding_size} (vocab_size)"
                          + (f"; model from {source}" if source else ""))
    return vocab
