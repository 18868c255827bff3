"""Data read at construction and tokenized once a vocabulary is bound (what a job does with its
checkpoint's); data fingerprints: file contents, settings and vocabulary, never paths."""

import json
import os
import shutil

import numpy as np
import pytest

from xwin_jax import fingerprint
from xwin_jax.data import formats, synthetic
from xwin_jax.data.formats import DataFormatError
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.data.prompts_data import PromptsData
from xwin_jax.data.sft_data import SftData
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import ConfigError

CASES = {
    "sft": lambda suite, **kw: SftData([suite["sft_train"]], **{
        "seq_len": 256, "batch_size": 4, "seed": 1, **kw}),
    "pairs": lambda suite, **kw: PairsData([suite["pairs_train"]], **{
        "seq_len": 320, "batch_size": 4, "seed": 1, **kw}),
    "prompts": lambda suite, **kw: PromptsData([suite["prompts_train"]], **{
        "max_prompt_len": 128, "batch_size": 4, "seed": 1, **kw}),
}
TOKENS = {"sft": "input_tokens", "pairs": "chosen_tokens", "prompts": "tokens"}  # a text row
TOKENIZED = {"sft": "examples", "pairs": "arrays", "prompts": "ids"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return synthetic.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0, num_prompts=200)


def per_epoch(data) -> int:
    return data.epoch_batches(0) if isinstance(data, SftData) else data.batches_per_epoch


def assert_same_batch(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("kind", CASES)
def test_bound_later_gives_exactly_the_batches_of_bound_at_construction(suite, kind,
                                                                        monkeypatch):
    eager = CASES[kind](suite, vocabulary="bytes")
    lazy = CASES[kind](suite)
    assert eager.has_vocabulary and not lazy.has_vocabulary
    # Binding tokenizes the records read at construction: no file is read again.
    for reader in ("read_sft", "read_pairs", "read_prompts"):
        monkeypatch.setattr(formats, reader, lambda *a, **k: pytest.fail("a file read again"))
    bound = lazy.with_vocabulary(ByteVocabulary())
    assert type(bound) is type(lazy) and bound.vocab == ByteVocabulary()
    assert not lazy.has_vocabulary  # the object gin built is left as it was
    assert bound.with_vocabulary("bytes") is bound  # already bound to it
    assert bound.report() == eager.report() and "no vocabulary" not in bound.report()
    epoch = per_epoch(eager)
    assert per_epoch(bound) == epoch >= 2
    for step in (0, 1, epoch - 1, epoch, epoch + 3):  # across an epoch boundary
        want = eager.global_batch(step)
        assert_same_batch(bound.global_batch(step), want)
        text = eager.vocab.decode(want[TOKENS[kind]][0])
        assert "USER:" in text and "ASSISTANT:" in text
    resumed, again = bound.batches(epoch - 1), eager.batches(epoch - 1)
    for _ in range(3):
        assert_same_batch(next(resumed), next(again))
    if kind == "pairs":
        assert bound.num_pairs == eager.num_pairs
        assert_same_batch(bound.arrays, eager.arrays)
    if kind == "prompts":
        assert bound.ids == eager.ids and bound.max_prompt_len == 128
    if kind == "sft":
        assert bound.examples == eager.examples and bound.stats == eager.stats


@pytest.mark.parametrize("kind", CASES)
def test_unbound_data_refuses_its_vocabulary_and_batches(suite, kind):
    data = CASES[kind](suite)
    for access in (lambda: data.vocab, lambda: data.global_batch(0),
                   lambda: next(data.batches(0)), lambda: getattr(data, TOKENIZED[kind])):
        with pytest.raises(ConfigError, match="the data has no vocabulary yet"):
            access()
    with pytest.raises(AttributeError, match="no_such_thing"):
        data.no_such_thing  # noqa: B018  (any other missing attribute is as before)
    assert "no vocabulary yet" in data.report() and data.vocabulary is None
    assert data.batch_size == 4 and data.fingerprint()["vocabulary"] is None
    read = {"sft": lambda: data.conversations, "pairs": lambda: data.num_pairs,
            "prompts": lambda: data.prompts}[kind]()
    count = len(formats.read_sft(suite["sft_train"])) if kind == "sft" else \
        len(formats.read_pairs(suite["pairs_train"])) if kind == "pairs" else \
        len(formats.read_prompts(suite["prompts_train"]))
    assert (read if kind == "pairs" else len(read)) == count > 4


def test_files_are_checked_at_construction_without_a_vocabulary(tmp_path, suite):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataFormatError, match=rf"{bad}:2: field 'output': missing"):
        SftData([str(bad)], seq_len=64, batch_size=1)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    with pytest.raises(DataFormatError, match=rf"{bad}:2: field 'chosen'"):
        PairsData([str(bad)], seq_len=64, batch_size=1)
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataFormatError, match=rf"{bad}:2: field 'prompt'"):
        PromptsData([str(bad)], max_prompt_len=64, batch_size=1)
    with pytest.raises(ConfigError, match="truncation='bogus'"):
        SftData([suite["sft_train"]], seq_len=64, batch_size=1, truncation="bogus")
    with pytest.raises(ConfigError, match="fewer than batch_size=100000"):
        PairsData([suite["pairs_train"]], seq_len=64, batch_size=100_000)
    # What only the vocabulary decides fails when it is bound, and leaves the data unbound.
    short = SftData([suite["sft_train"]], seq_len=8, batch_size=1)
    with pytest.raises(ConfigError, match="no usable SFT examples"):
        short.with_vocabulary("bytes")
    assert not short.has_vocabulary


def test_a_vocabulary_given_at_construction_tokenizes_at_once(suite):
    data = SftData([suite["sft_train"]], seq_len=256, batch_size=4, vocabulary=ByteVocabulary())
    assert data.has_vocabulary and len(data.examples) == data.stats.examples > 4
    assert data.fingerprint()["vocabulary"] == ByteVocabulary().fingerprint()


def sft(path, **kwargs):
    return SftData([str(path)], **{"seq_len": 256, "batch_size": 4, "vocabulary": "bytes",
                                   **kwargs})


def test_fingerprint_is_the_contents_and_settings_not_the_path(suite, tmp_path):
    path = tmp_path / "a.jsonl"
    shutil.copy(suite["sft_train"], path)
    data = sft(path)
    base = data.fingerprint()
    assert base == {"type": "SftData", "files": [fingerprint.file_identity(str(path))],
                    "seq_len": 256, "batch_size": 4, "seed": 0, "system": None,
                    "truncation": "drop_turns", "skip_invalid": False,
                    "vocabulary": ByteVocabulary().fingerprint()}
    assert base["files"][0]["size"] == os.path.getsize(path) > 0
    assert len(base["files"][0]["sha256"]) == 64
    assert fingerprint.describe(data) == json.loads(json.dumps(base))  # what a job records
    assert fingerprint.describe(data.with_vocabulary("bytes")) == base

    # The same contents at another path are the same input.
    elsewhere = tmp_path / "moved" / "b.jsonl"
    elsewhere.parent.mkdir()
    shutil.copy(path, elsewhere)
    assert sft(elsewhere).fingerprint() == base

    # Settings and vocabulary.
    assert fingerprint.changes(base, sft(path, seed=3).fingerprint()) == ["seed: 0 → 3"]
    assert fingerprint.changes(base, sft(path, seq_len=512).fingerprint()) == [
        "seq_len: 256 → 512"]
    unbound = sft(path, vocabulary=None).fingerprint()
    assert unbound["vocabulary"] is None and unbound != base
    assert {**unbound, "vocabulary": base["vocabulary"]} == base
    assert sft(path, vocabulary=None).with_vocabulary(ByteVocabulary()).fingerprint() == base

    # The same path rewritten is another input; the data read before keeps what it read.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[1:]))
    rewritten = sft(path).fingerprint()
    assert rewritten["files"] != base["files"] and rewritten["files"][0]["size"] < \
        base["files"][0]["size"]
    assert {**rewritten, "files": base["files"]} == base
    assert data.fingerprint() == base
    assert len(sft(path).examples) == len(data.examples) - 1


@pytest.mark.parametrize("kind", ["pairs", "prompts"])
def test_pairs_and_prompts_fingerprints(suite, tmp_path, kind):
    key = "pairs_train" if kind == "pairs" else "prompts_train"
    moved = tmp_path / "copy.jsonl"
    shutil.copy(suite[key], moved)
    base = CASES[kind](suite, vocabulary="bytes").fingerprint()
    length = "seq_len" if kind == "pairs" else "max_prompt_len"
    assert base == {"type": "PairsData" if kind == "pairs" else "PromptsData",
                    "files": [fingerprint.file_identity(suite[key])], length: base[length],
                    "batch_size": 4, "seed": 1, "system": None, "skip_invalid": False,
                    "vocabulary": ByteVocabulary().fingerprint(),
                    **({} if kind == "pairs" else {"bucket_multiple": 64})}
    assert CASES[kind]({**suite, key: str(moved)}, vocabulary="bytes").fingerprint() == base
    assert fingerprint.changes(base, CASES[kind](suite, vocabulary="bytes",
                                                 seed=2).fingerprint()) == ["seed: 1 → 2"]
    assert fingerprint.changes(base, CASES[kind](suite, vocabulary="bytes", **{
        length: 300}).fingerprint()) == [f"{length}: {base[length]} → 300"]
    assert CASES[kind](suite).fingerprint()["vocabulary"] is None


def test_another_vocabulary_is_other_data(suite, tmp_path):
    """A SentencePiece vocabulary bound later tokenizes as one given at construction, and
    fingerprints (and batches) differently from bytes."""
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(
        f"USER: what is {a} plus {b}? ASSISTANT: The answer is {a + b}"
        for a in range(30) for b in range(7)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
        model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    model = str(tmp_path / "sp.model")
    eager = sft(suite["sft_train"], vocabulary=model)
    bound = sft(suite["sft_train"], vocabulary=None).with_vocabulary(model)
    assert_same_batch(bound.global_batch(2), eager.global_batch(2))
    as_bytes = sft(suite["sft_train"])
    assert eager.fingerprint()["vocabulary"] != as_bytes.fingerprint()["vocabulary"]
    assert {**eager.fingerprint(), "vocabulary": None} == {**as_bytes.fingerprint(),
                                                           "vocabulary": None}
    assert as_bytes.with_vocabulary(model).fingerprint() == eager.fingerprint()
    assert not np.array_equal(eager.global_batch(0)["input_tokens"],
                              as_bytes.global_batch(0)["input_tokens"])
