"""Vocabularies: bytes, SentencePiece and tokenizer.json; their special ids, their files, and
the rule that picks a job's vocabulary. Every tokenizer here is built locally (no hub)."""

import json
import os
import shutil

import jax
import pytest

from xwin_jax.checkpoints import params as params_ckpt
from xwin_jax.data import vocabulary as V
from xwin_jax.errors import ConfigError
from xwin_jax.models.llama import init_params, preset

CORPUS = """\
Beautiful is better than ugly. Explicit is better than implicit.
Simple is better than complex. Complex is better than complicated.
Flat is better than nested. Sparse is better than dense. Readability counts.
Special cases aren't special enough to break the rules.
Although practicality beats purity. Errors should never pass silently.
In the face of ambiguity, refuse the temptation to guess.
There should be one and preferably only one obvious way to do it.
Now is better than never. Although never is often better than right now.
If the implementation is hard to explain, it's a bad idea.
USER: Hello, who are you? ASSISTANT: I am a helpful assistant, and I answer questions.
USER: What is 12 plus 30? ASSISTANT: 12 plus 30 is 42.
Grüße aus Köln. Ça va très bien. Une crème brûlée au café, s'il vous plaît.
日本語のテキストです。 Ελληνικά γράμματα.
"""

# Ordinary text: non-ASCII, leading and repeated spaces, whitespace of all kinds.
TEXTS = ["Beautiful is better than ugly.", " leading space", "  two leading spaces",
         "Grüße aus Köln, ça va?", "日本語 ☃ 🎉 emoji", "lines\nand\ttabs  and  gaps",
         "x", "trailing ", "USER: Hi ASSISTANT: 42"]


def train_sentencepiece(directory, name="tokenizer.model", **options):
    """A Llama-style SentencePiece model (BPE, byte fallback, no normalization), 400 pieces;
    unk 0, BOS 1, EOS 2 and no pad piece unless options say otherwise."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "sp")
    settings = dict(vocab_size=400, model_type="bpe", byte_fallback=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                    character_coverage=1.0, minloglevel=2, num_threads=1)
    settings.update(options)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_prefix=prefix, **settings)
    os.remove(prefix + ".vocab")
    path = os.path.join(directory, name)
    os.replace(prefix + ".model", path)
    return path


def write_llama_tokenizer_dir(model_file, directory):
    """tokenizer.json + tokenizer_config.json as transformers' LlamaTokenizer saves them
    (converted from the SentencePiece model; no tokenizer.model left beside them)."""
    import transformers
    src = os.path.join(os.path.dirname(directory), "llama_src")
    os.makedirs(src, exist_ok=True)
    shutil.copyfile(model_file, os.path.join(src, V.TOKENIZER_MODEL))
    tok = transformers.LlamaTokenizer.from_pretrained(src, legacy=False, pad_token="<unk>")
    tok.save_pretrained(directory)
    if os.path.exists(os.path.join(directory, V.TOKENIZER_MODEL)):
        os.remove(os.path.join(directory, V.TOKENIZER_MODEL))
    return directory


def write_bpe_tokenizer(directory, specials=("<unk>", "<|begin|>", "<|end|>", "<|pad|>"),
                        unk="<unk>", config=None, special_tokens_map=None,
                        generation_config=None):
    """A byte-level BPE trained with `tokenizers` (no prefix space) plus whichever config
    files are given; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    path = os.path.join(directory, V.TOKENIZER_JSON)
    tok.save(path)
    for name, content in ((V.TOKENIZER_CONFIG, config), (V.SPECIAL_TOKENS_MAP, special_tokens_map),
                          (V.GENERATION_CONFIG, generation_config)):
        if content is not None:
            with open(os.path.join(directory, name), "w") as f:
                json.dump(content, f)
    return path


def added(content):
    """A special token as older transformers write it into tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


BPE_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added("<|begin|>"),
              "eos_token": added("<|end|>"), "pad_token": "<|pad|>", "unk_token": "<unk>"}


def auto_tokenizer(directory):
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(directory)


def assert_same_ids(vocab, directory, texts=TEXTS):
    """AutoTokenizer.from_pretrained(directory) encodes every text as `vocab` does."""
    tok = auto_tokenizer(directory)
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == vocab.encode(text), text
    return tok


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    return train_sentencepiece(str(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def llama_json_dir(tmp_path_factory, sp_file):
    return write_llama_tokenizer_dir(sp_file, str(tmp_path_factory.mktemp("llama") / "tok"))


# --- the three kinds --------------------------------------------------------------------------

def test_byte_vocabulary_ids_are_unchanged():
    vocab = V.get_vocabulary("bytes")
    assert (vocab.kind, vocab.vocab_size, vocab.pad_id, vocab.bos_id, vocab.eos_id,
            vocab.space_prefix) == ("bytes", 259, 0, 1, 2, False)
    assert vocab.encode("Aé") == [0x41 + 3, 0xC3 + 3, 0xA9 + 3]
    assert vocab.decode([1, 0x41 + 3, 0xC3 + 3, 0xA9 + 3, 2, 0]) == "Aé"
    assert vocab == V.ByteVocabulary() and len({vocab, V.ByteVocabulary()}) == 1


def test_sentencepiece_from_file_and_directory(sp_file, tmp_path):
    vocab = V.get_vocabulary(sp_file)
    assert isinstance(vocab, V.SentencePieceVocabulary) and vocab.kind == "sentencepiece"
    # No pad piece: unk (0) pads, and stays distinct from EOS.
    assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (400, 1, 2, 0)
    assert vocab.space_prefix  # the dummy prefix: "x" encodes as "▁x"
    for text in TEXTS + ["</s> <s> as text"]:
        ids = vocab.encode(text)
        assert 1 not in ids and 2 not in ids  # no BOS/EOS added, none injected
        assert vocab.decode(ids) == text
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copyfile(sp_file, copy / "tokenizer.model")
    from_dir = V.get_vocabulary(str(copy))
    assert from_dir == vocab and hash(from_dir) == hash(vocab)  # by content, not path
    assert str(copy) not in json.dumps(from_dir.fingerprint())


def test_sentencepiece_pad_piece_and_no_dummy_prefix(tmp_path):
    vocab = V.get_vocabulary(train_sentencepiece(str(tmp_path / "a"), pad_id=3))
    assert (vocab.pad_id, vocab.eos_id) == (3, 2)
    plain = V.get_vocabulary(train_sentencepiece(str(tmp_path / "b"), add_dummy_prefix=False))
    assert not plain.space_prefix and plain.decode(plain.encode(" x y")) == " x y"
    assert plain != V.get_vocabulary(train_sentencepiece(str(tmp_path / "c")))


def test_tokenizer_json_special_ids_from_its_config(tmp_path):
    path = write_bpe_tokenizer(str(tmp_path / "tc"), config=BPE_CONFIG)
    vocab = V.get_vocabulary(path)
    assert vocab.kind == "hf_tokenizer" and vocab.vocab_size == 350
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (1, 2, 3)  # trainer's special order
    assert not vocab.space_prefix  # ByteLevel without add_prefix_space
    for text in TEXTS:
        ids = vocab.encode(text)
        assert vocab.decode(ids) == text
        assert not {vocab.bos_id, vocab.eos_id} & set(ids)  # neither added nor injected
    # Special-token text in the input stays text (as with SentencePiece): no injected EOS.
    assert 2 not in vocab.encode("<|end|>") and vocab.decode(vocab.encode("<|end|>")) == "<|end|>"
    # The same ids from special_tokens_map.json alone, and from generation_config.json ids.
    alone = V.get_vocabulary(write_bpe_tokenizer(
        str(tmp_path / "stm"), special_tokens_map={"bos_token": "<|begin|>",
                                                   "eos_token": added("<|end|>"),
                                                   "pad_token": "<|pad|>"}))
    assert (alone.bos_id, alone.eos_id, alone.pad_id) == (1, 2, 3)
    write_bpe_tokenizer(str(tmp_path / "gen"), generation_config={
        "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 2})
    by_id = V.get_vocabulary(str(tmp_path / "gen"))
    # generation_config's pad = EOS (what HF generate likes) is skipped: unk (0) pads.
    assert (by_id.bos_id, by_id.eos_id, by_id.pad_id) == (1, 2, 0)


def test_tokenizer_json_without_pad_token(tmp_path):
    no_pad = dict(BPE_CONFIG)
    del no_pad["pad_token"]
    vocab = V.get_vocabulary(write_bpe_tokenizer(str(tmp_path / "unk"), config=no_pad))
    assert vocab.pad_id == 0  # the unk token
    no_unk = dict(no_pad, unk_token=None)
    vocab = V.get_vocabulary(write_bpe_tokenizer(str(tmp_path / "special"), unk=None,
                                                 specials=("<|begin|>", "<|end|>", "<|x|>"),
                                                 config=no_unk))
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 2)  # the other special token
    path = write_bpe_tokenizer(str(tmp_path / "none"), unk=None,
                               specials=("<|begin|>", "<|end|>"), config=no_unk)
    with pytest.raises(ConfigError, match=r"no pad token, and no unk or other special token"):
        V.get_vocabulary(path)


def test_pad_equal_to_eos_is_refused_naming_the_file(tmp_path):
    bad = dict(BPE_CONFIG, pad_token="<|end|>")
    path = write_bpe_tokenizer(str(tmp_path / "bad"), config=bad)
    config_path = os.path.join(str(tmp_path / "bad"), V.TOKENIZER_CONFIG)
    with pytest.raises(ConfigError, match=r"pad_token '<\|end\|>' is the EOS token") as err:
        V.get_vocabulary(path)
    assert config_path in str(err.value)


def test_missing_special_tokens_are_named(tmp_path):
    path = write_bpe_tokenizer(str(tmp_path / "nobos"), config={"eos_token": "<|end|>"})
    with pytest.raises(ConfigError, match=r"no BOS token"):
        V.get_vocabulary(path)
    path = write_bpe_tokenizer(str(tmp_path / "unknown"),
                               config=dict(BPE_CONFIG, bos_token="<|nope|>"))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json: bos_token '<\|nope\|>' is "
                                          r"not a token"):
        V.get_vocabulary(path)


def test_llama_tokenizer_json(llama_json_dir, sp_file):
    vocab = V.get_vocabulary(llama_json_dir)
    assert vocab.kind == "hf_tokenizer" and vocab.space_prefix  # Metaspace prepends "▁"
    assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (400, 1, 2, 0)
    sp = V.get_vocabulary(sp_file)
    assert vocab.encode("Beautiful is better") == sp.encode("Beautiful is better")
    for text in TEXTS:
        if not text.startswith(" "):  # (Metaspace folds a leading space into its prefix)
            assert vocab.decode(vocab.encode(text)) == text


def test_bad_specs_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.model.*no such file"):
        V.get_vocabulary(str(tmp_path / "nope.model"))
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*holds no tokenizer"):
        V.get_vocabulary(str(tmp_path))
    (tmp_path / "junk.model").write_bytes(b"\x00not a model")
    with pytest.raises(ConfigError, match=r"junk\.model.*not a SentencePiece model"):
        V.get_vocabulary(str(tmp_path / "junk.model"))
    (tmp_path / "junk.json").write_text('{"model": 3}')
    with pytest.raises(ConfigError, match=r"junk\.json.*not a Hugging Face tokenizer\.json"):
        V.get_vocabulary(str(tmp_path / "junk.json"))


# --- loading, saving, resolving ---------------------------------------------------------------

def test_load_vocabulary_prefers_the_record_then_tokenizer_json(tmp_path, sp_file,
                                                                llama_json_dir):
    assert V.load_vocabulary(str(tmp_path)) is None
    both = tmp_path / "both"
    shutil.copytree(llama_json_dir, both)
    shutil.copyfile(sp_file, both / "tokenizer.model")
    assert V.load_vocabulary(str(both)).kind == "hf_tokenizer"
    V.get_vocabulary(sp_file).save(str(both))  # vocabulary.json now says sentencepiece
    assert V.load_vocabulary(str(both)) == V.get_vocabulary(sp_file)


def test_save_writes_what_autotokenizer_loads_with_the_same_ids(tmp_path, sp_file,
                                                                llama_json_dir):
    bpe = write_bpe_tokenizer(str(tmp_path / "bpe_src"), config=BPE_CONFIG)
    for name, vocab in [("bytes", V.ByteVocabulary()), ("sp", V.get_vocabulary(sp_file)),
                        ("llama_json", V.get_vocabulary(llama_json_dir)),
                        ("bpe", V.get_vocabulary(bpe))]:
        out = str(tmp_path / name)
        written = vocab.save(out)
        assert V.VOCABULARY_FILE in written and V.TOKENIZER_CONFIG in written
        record = json.load(open(os.path.join(out, V.VOCABULARY_FILE)))
        assert record["kind"] == vocab.kind and record["pad_id"] == vocab.pad_id
        assert all(os.path.exists(os.path.join(out, f)) for f in record["files"])
        tok = assert_same_ids(vocab, out)
        assert (tok.bos_token_id, tok.eos_token_id) == (vocab.bos_id, vocab.eos_id), name
        assert tok.pad_token_id == vocab.pad_id, name
        assert V.load_vocabulary(out) == vocab, name


def test_sentencepiece_save_keeps_leading_spaces_exact(tmp_path, sp_file):
    """The generated tokenizer.json encodes as SentencePiece does, dummy prefix included
    (transformers' own LlamaTokenizer conversion drops a space before leading spaces)."""
    vocab = V.get_vocabulary(sp_file)
    vocab.save(str(tmp_path))
    tok = auto_tokenizer(str(tmp_path))
    ids = vocab.encode("  two")
    assert tok("  two", add_special_tokens=False).input_ids == ids
    assert tok.decode(ids) == "  two"
    assert tok("hi").input_ids[0] == vocab.bos_id  # HF callers still get Llama's BOS


def test_tampered_record_is_refused(tmp_path, sp_file):
    V.get_vocabulary(sp_file).save(str(tmp_path))
    record_path = tmp_path / V.VOCABULARY_FILE
    record = json.load(open(record_path))
    json.dump(dict(record, eos_id=5), open(record_path, "w"))
    with pytest.raises(ConfigError, match=r"vocabulary\.json: records eos_id 5"):
        V.load_vocabulary(str(tmp_path))


def test_resolve_vocabulary_rules(sp_file, llama_json_dir, capsys):
    sp = V.get_vocabulary(sp_file)
    recorded = V.get_vocabulary(llama_json_dir)
    # None → the recorded one, silently.
    assert V.resolve_vocabulary(None, recorded, 512, "/ckpt/a") is recorded
    assert capsys.readouterr().out == ""
    # Explicit overrides the recorded one, visibly.
    assert V.resolve_vocabulary(sp_file, recorded, 512, "/ckpt/a") == sp
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "/ckpt/a" in out and "overrides" in out
    assert V.resolve_vocabulary(sp, V.get_vocabulary(sp_file), 512, "/ckpt/a") is sp
    assert capsys.readouterr().out == ""  # equal by content: nothing to say
    # Neither: bytes for a random init, an error for a checkpoint.
    assert V.resolve_vocabulary(None, None, 512, None) == V.ByteVocabulary()
    with pytest.raises(ConfigError, match=r"/ckpt/old records no vocabulary \(written before "
                                          r"checkpoints carried their tokenizer\); set "
                                          r"VOCABULARY"):
        V.resolve_vocabulary(None, None, 512, "/ckpt/old")
    # More ids than the embedding has rows: refused, both sizes named.
    with pytest.raises(ConfigError, match=r"VOCABULARY .*tokenizer\.model.* has 400 ids but the "
                                          r"model's embedding has 300 \(vocab_size\)"):
        V.resolve_vocabulary(sp_file, None, 300, None)
    assert V.resolve_vocabulary("bytes", None, None, None) == V.ByteVocabulary()


def test_save_params_records_the_vocabulary(tmp_path, sp_file):
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    ckpt = str(tmp_path / "ckpt")
    sp = V.get_vocabulary(sp_file)
    params_ckpt.save_params(ckpt, cfg, params, vocabulary=sp)
    assert params_ckpt.load_checkpoint_vocabulary(ckpt) == sp
    assert {"tokenizer.model", "tokenizer.json", "vocabulary.json"} <= set(os.listdir(ckpt))
    # Re-saved in place with the vocabulary it records: the files survive their own removal.
    params_ckpt.save_params(ckpt, cfg, params,
                            vocabulary=params_ckpt.load_checkpoint_vocabulary(ckpt))
    assert params_ckpt.load_checkpoint_vocabulary(ckpt) == sp
    # Re-saved with another vocabulary: the old tokenizer files go.
    params_ckpt.save_params(ckpt, cfg, params, vocabulary=V.ByteVocabulary())
    assert params_ckpt.load_checkpoint_vocabulary(ckpt) == V.ByteVocabulary()
    assert not os.path.exists(os.path.join(ckpt, "tokenizer.model"))
    # Without one: nothing recorded (and nothing stale left behind).
    params_ckpt.save_params(ckpt, cfg, params)
    assert params_ckpt.load_checkpoint_vocabulary(ckpt) is None
    assert params_ckpt.load_config(ckpt) == cfg


def test_copy_tokenizer_files(tmp_path, llama_json_dir):
    (tmp_path / "src").mkdir()
    for name in os.listdir(llama_json_dir):
        shutil.copyfile(os.path.join(llama_json_dir, name), tmp_path / "src" / name)
    (tmp_path / "src" / "model.safetensors").write_bytes(b"weights")
    copied = V.copy_tokenizer_files(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert copied == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "dst")) == copied
