"""Packing and packed SFT batches: every token once, per-host shards, exact resumption."""

import numpy as np
import pytest

from xwin_jax.data import packing, synthetic
from xwin_jax.data.sft_data import SftData


def test_packing_keeps_every_token_once_with_segments_and_positions():
    rng = np.random.default_rng(0)
    examples = [(rng.integers(3, 200, n).tolist(), rng.integers(0, 2, n).tolist())
                for n in rng.integers(2, 12, 40)]
    packed = packing.pack_examples(examples, seq_len=16)
    rebuilt = []
    for r in range(len(packed["input_tokens"])):
        segments = packed["segment_ids"][r]
        for s in range(1, segments.max() + 1):
            where = segments == s
            inputs, targets = packed["input_tokens"][r][where], packed["target_tokens"][r][where]
            np.testing.assert_array_equal(packed["positions"][r][where], np.arange(where.sum()))
            rebuilt.append((list(inputs) + [targets[-1]], packed["loss_weights"][r][where]))
        assert (packed["input_tokens"][r][segments == 0] == 0).all()
    assert len(rebuilt) == len(examples)
    for (ids, mask), (tokens, weights) in zip(examples, rebuilt):
        assert tokens == ids
        np.testing.assert_array_equal(weights, mask[1:])
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_examples([(list(range(20)), [1] * 20)], seq_len=16)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return synthetic.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0, num_prompts=600)


def test_batches_resume_at_the_same_example(suite):
    data = SftData([suite["sft_train"]], seq_len=256, batch_size=4, seed=1,
                   vocabulary="bytes")
    assert "SFT examples" in data.report() and data.stats.dropped_examples == 0
    first = data.batches(0)
    stream = [next(first) for _ in range(data.epoch_batches(0) + 3)]  # crosses an epoch
    resumed = data.batches(len(stream) - 5)
    for expected in stream[-5:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    # A fresh object (a restarted process) produces the same batches.
    again = SftData([suite["sft_train"]], seq_len=256, batch_size=4, seed=1,
                    vocabulary="bytes")
    np.testing.assert_array_equal(again.global_batch(7)["input_tokens"],
                                  data.global_batch(7)["input_tokens"])
    # Epochs are reshuffled.
    assert not np.array_equal(data.global_batch(0)["input_tokens"],
                              data.global_batch(data.epoch_batches(0))["input_tokens"])


def test_host_shards_are_disjoint_and_complete(suite, monkeypatch):
    data = SftData([suite["sft_train"]], seq_len=256, batch_size=6, seed=0,
                   vocabulary="bytes")
    whole = data.global_batch(2)
    parts = []
    for index in range(3):
        monkeypatch.setattr("jax.process_count", lambda: 3)
        monkeypatch.setattr("jax.process_index", lambda index=index: index)
        parts.append(data.local_batch(2))
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    monkeypatch.setattr("jax.process_count", lambda: 4)
    with pytest.raises(ValueError, match="does not split over 4 hosts"):
        data.local_batch(0)


def test_loss_weights_cover_answers_and_eos_only(suite):
    data = SftData([suite["sft_train"]], seq_len=512, batch_size=2, vocabulary="bytes")
    assert data.stats.truncated_examples == 0
    batch = data.global_batch(0)
    targets = batch["target_tokens"][batch["loss_weights"] > 0]
    text = data.vocab.decode([t for t in targets if t != data.vocab.eos_id])
    assert "The answer is" in text and "USER:" not in text and "ASSISTANT" not in text
    segments = {(r, batch["segment_ids"][r, c]) for r, c in zip(*np.nonzero(batch["segment_ids"]))}
    # One </s> per answer (each states "The answer is" once; a two-exchange example has two).
    eos = (targets == data.vocab.eos_id).sum()
    assert eos == text.count("The answer is") and eos >= len(segments)
