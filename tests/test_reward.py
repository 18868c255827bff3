"""Reward-model training: the Bradley-Terry loss against NumPy, and the job end to end: the
checkpoint's tokenizer, reward statistics the scorer normalises to mean 0 / std 1, resume,
and the stage's skip / refuse / overwrite through gin/runs/reward.gin."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from xwin_jax import launch, rewards
from xwin_jax.checkpoints.params import load_head, load_params, save_params
from xwin_jax.data import synthetic
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.data.vocabulary import ByteVocabulary, SentencePieceVocabulary, load_vocabulary
from xwin_jax.models import heads, llama
from xwin_jax.train import reward
from xwin_jax.train.stage import StageChanged
from xwin_jax.train.state import OptimizerConfig

# Small enough to train in seconds; the gin runs take the architecture from the checkpoint.
CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return synthetic.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0,
                                 num_prompts=300)


@pytest.fixture(scope="module")
def pairs(suite):
    return suite["pairs_train"]


def test_loss_matches_numpy_bradley_terry_with_margin_and_centering(pairs):
    batch = PairsData([pairs], seq_len=320, batch_size=4, vocabulary="bytes").global_batch(0)
    batch["chosen_rating"][1] = np.nan  # a pair without ratings has no margin
    params = heads.init_reward_params(CFG, jax.random.key(0))
    model = heads.RewardModel(CFG)
    chosen, rejected = (np.asarray(x) for x in reward.pair_rewards(model, params, batch))
    gap = np.nan_to_num(batch["chosen_rating"] - batch["rejected_rating"])
    expected = np.sum(np.log1p(np.exp(-(chosen - rejected - 0.1 * gap))))
    expected_center = 0.01 * np.sum((chosen + rejected) ** 2)
    out = reward.reward_loss_fn(CFG, margin_scale=0.1, centering=0.01)(params, batch)
    np.testing.assert_allclose(float(out.sums["pairwise_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["centering"]), expected_center, rtol=1e-5)
    np.testing.assert_allclose(float(out.objective), expected + expected_center, rtol=1e-5)
    assert float(out.sums["accuracy"]) == np.sum(chosen > rejected)
    assert float(out.count) == 4 and out.count_name == "num_pairs"
    means = out.means()  # what the step logs: per pair, the loss being what is minimised
    np.testing.assert_allclose(float(means["loss"]), (expected + expected_center) / 4,
                               rtol=1e-5)
    np.testing.assert_allclose(float(means["margin"]), np.mean(chosen - rejected), rtol=1e-5)
    # Each side's reward is the model's score of that row alone.
    row = batch["chosen_tokens"][2, :batch["chosen_length"][2]]
    alone = model.apply({"params": params}, row[None], np.ones((1, len(row)), np.int32))
    np.testing.assert_allclose(chosen[2], np.asarray(alone)[0], atol=1e-5)


def test_pairs_batches_are_deterministic_per_step(pairs):
    data = PairsData([pairs], seq_len=320, batch_size=8, seed=3, vocabulary="bytes")
    again = PairsData([pairs], seq_len=320, batch_size=8, seed=3, vocabulary="bytes")
    step = data.batches_per_epoch + 1  # second epoch
    for key in data.arrays:
        np.testing.assert_array_equal(data.global_batch(step)[key], again.global_batch(step)[key])


def _sentencepiece(tmp_path, suite):
    """A small SentencePiece tokenizer trained on the suite's pairs (the suite's text has
    fewer than 500 pieces)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    records = [json.loads(line) for line in open(suite["pairs_train"])]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"USER: {r['prompt']} ASSISTANT: {r['chosen']}"
                                for r in records))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, bos_id=1,
        eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, character_coverage=0.99,
        minloglevel=2)
    return SentencePieceVocabulary(str(tmp_path / "sp.model"))


def test_reward_job_uses_the_checkpoints_tokenizer_normalises_and_resumes(suite, tmp_path):
    """From an LM checkpoint that records a SentencePiece tokenizer, with no vocabulary
    given: the pairs are tokenized with it, final/ carries it, and the exported stats make
    the scorer's rewards of the reference pairs mean 0, std 1. A killed run resumes to the
    same export."""
    vocab = _sentencepiece(tmp_path, suite)
    save_params(str(tmp_path / "sft"), CFG, llama.init_params(CFG, jax.random.key(0)),
                vocabulary=vocab)
    held_out = tmp_path / "held_out.jsonl"  # one batch: the stats cover every pair
    held_out.write_text("".join(open(suite["pairs_valid"]).readlines()[:8]))

    def run():
        return reward.train_reward(
            str(tmp_path), CFG, 12, PairsData([suite["pairs_train"]], 320, 8),
            eval_data=PairsData([str(held_out)], 320, 8, seed=1),
            optimizer=OptimizerConfig(learning_rate=1e-3), init_dir=str(tmp_path / "sft"),
            eval_batches=1, stats_batches=1, checkpoint_every=6, async_checkpoints=False)

    summary = run()
    final = summary["export_dir"]
    assert load_head(final) == "score" and load_vocabulary(final) == vocab
    cfg, params = load_params(final)
    assert set(params) == {"model", "score"} and cfg == CFG
    recorded = json.load(open(tmp_path / "reward" / "fingerprint.json"))["fingerprint"]
    assert recorded["train_data"]["vocabulary"] == vocab.fingerprint()
    assert recorded["start"]["checkpoint"]["vocabulary"] == vocab.fingerprint()

    stats = rewards.RewardStats.load(final)
    assert stats.count == 16 and summary["reward_stats"]["std"] == stats.std > 0
    scorer = rewards.RewardScorer.load(final, CFG)
    assert scorer.checkpoint.vocabulary == vocab
    records = [json.loads(line) for line in open(held_out)]
    prompts = [r["prompt"] for r in records]
    chosen, rejected = (scorer.score_texts(prompts, [r[side] for r in records], vocab,
                                           seq_len=320, batch_size=8)
                        for side in ("chosen", "rejected"))
    both = np.concatenate([chosen, rejected])
    assert abs(both.mean()) < 1e-4 and both.std() == pytest.approx(1.0, abs=1e-4)
    assert summary["final_eval"]["accuracy"] == np.mean(chosen > rejected)
    assert summary["final_eval"]["margin"] == pytest.approx(
        np.mean(chosen - rejected) * stats.std, rel=1e-4)

    stage = tmp_path / "reward"
    assert sorted(os.listdir(stage / "checkpoints")) == ["12", "6"]
    # Killed after the step-6 checkpoint: the same command resumes to the same result.
    for name in ("summary.json", "final", "checkpoints/12"):
        shutil.rmtree(stage / name) if os.path.isdir(stage / name) else os.remove(stage / name)
    resumed = run()
    assert resumed["resumed_from_step"] == 6
    assert resumed["reward_stats"] == summary["reward_stats"]
    jax.tree.map(np.testing.assert_array_equal, load_params(final)[1], params)


def test_reward_gin_run_skips_refuses_a_changed_learning_rate_and_overwrites(pairs, tmp_path,
                                                                             capsys):
    save_params(str(tmp_path / "sft"), CFG, llama.init_params(CFG, jax.random.key(1)),
                vocabulary=ByteVocabulary())
    files = ["models/tiny.gin", "mesh/single.gin", "runs/reward.gin"]
    bindings = [f"WORKDIR = '{tmp_path}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
                "SEQ_LEN = 320", f"TRAIN_PAIRS = ['{pairs}']",
                f"reward.train_reward.init_dir = '{tmp_path / 'sft'}'",
                "reward.train_reward.async_checkpoints = False"]
    first = launch.run_gin_job(files, bindings)
    stage = tmp_path / "reward"
    # No VOCABULARY: the checkpoint's bytes; the default learning rate, halfway down its
    # cosine at the second of two steps.
    assert load_vocabulary(first["export_dir"]) == ByteVocabulary()
    assert first["final_metrics"]["learning_rate"] == pytest.approx(0.5e-5)
    assert (stage / "config.gin").exists() and (stage / "operative_config.gin").exists()
    capsys.readouterr()

    again = launch.run_gin_job(files, bindings)
    assert "[reward] already finished" in capsys.readouterr().out
    assert again == first

    changed = bindings + ["LEARNING_RATE = 1e-3"]
    with pytest.raises(StageChanged, match=r"optimizer\.learning_rate: 1e-05 → 0\.001"):
        launch.run_gin_job(files, changed)
    assert json.load(open(stage / "summary.json")) == first  # refused: nothing touched

    rerun = launch.run_gin_job(files, changed + ["jobs.run.overwrite = True"])
    assert rerun["resumed_from_step"] is None and rerun["fingerprint"] != first["fingerprint"]
    assert rerun["final_metrics"]["learning_rate"] == pytest.approx(0.5e-3)
    assert sorted(os.listdir(stage / "checkpoints")) == ["2"]
