"""Reward-model training: the Bradley-Terry loss against NumPy, and the job end to end."""

import json
import os

import jax
import numpy as np
import pytest

from xwin_jax.checkpoints.params import load_head, load_params
from xwin_jax.data import synthetic
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.models import heads, llama
from xwin_jax.train import reward

CFG = llama.preset("tiny")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return synthetic.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0,
                                 num_prompts=300)["pairs_train"]


def test_loss_matches_numpy_bradley_terry_with_margin_and_centering(pairs):
    batch = PairsData([pairs], seq_len=320, batch_size=4).global_batch(0)
    batch["chosen_rating"][1] = np.nan  # a pair without ratings has no margin
    params = heads.init_reward_params(CFG, jax.random.key(0))
    model = heads.RewardModel(CFG)
    chosen, rejected = (np.asarray(x) for x in reward.pair_rewards(model, params, batch))
    gap = np.nan_to_num(batch["chosen_rating"] - batch["rejected_rating"])
    expected = np.sum(np.log1p(np.exp(-(chosen - rejected - 0.1 * gap))))
    expected_center = 0.01 * np.sum((chosen + rejected) ** 2)
    objective, sums = reward.reward_loss_fn(CFG, margin_scale=0.1, centering=0.01)(params, batch)
    np.testing.assert_allclose(float(sums["loss_sum"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(sums["centering_sum"]), expected_center, rtol=1e-5)
    np.testing.assert_allclose(float(objective), expected + expected_center, rtol=1e-5)
    assert float(sums["correct"]) == np.sum(chosen > rejected) and float(sums["num_pairs"]) == 4
    # Each side's reward is the model's score of that row alone.
    row = batch["chosen_tokens"][2, :batch["chosen_length"][2]]
    alone = model.apply({"params": params}, row[None], np.ones((1, len(row)), np.int32))
    np.testing.assert_allclose(chosen[2], np.asarray(alone)[0], atol=1e-5)


def test_score_responses_equals_the_training_pairs_rewards(pairs):
    data = PairsData([pairs], seq_len=320, batch_size=5)
    batch = data.global_batch(0)
    params = heads.init_reward_params(CFG, jax.random.key(1))
    chosen, _ = reward.pair_rewards(heads.RewardModel(CFG), params, batch)
    records = [json.loads(line) for line in open(pairs)]
    order = np.random.default_rng([0, 0]).permutation(len(records))[:5]  # global_batch(0)'s rows
    prompts = [records[i]["prompt"] for i in order]
    responses = [records[i]["chosen"] for i in order]
    scores = reward.score_responses(CFG, params, prompts, responses, seq_len=320, batch_size=3)
    np.testing.assert_allclose(scores, np.asarray(chosen), atol=1e-5)
    normalised = reward.score_responses(CFG, params, prompts, responses, seq_len=320,
                                        stats={"mean": 1.0, "std": 2.0})
    np.testing.assert_allclose(normalised, (scores - 1.0) / 2.0, atol=1e-5)


def test_pairs_batches_are_deterministic_per_step(pairs):
    data = PairsData([pairs], seq_len=320, batch_size=8, seed=3)
    again = PairsData([pairs], seq_len=320, batch_size=8, seed=3)
    step = data.batches_per_epoch + 1  # second epoch
    for key in data.arrays:
        np.testing.assert_array_equal(data.global_batch(step)[key], again.global_batch(step)[key])


def test_train_reward_job_exports_a_scoring_checkpoint_and_stats(pairs, tmp_path):
    train = PairsData([pairs], seq_len=320, batch_size=8, seed=0)
    held_out = PairsData([pairs], seq_len=320, batch_size=8, seed=1)
    summary = reward.train_reward(str(tmp_path), CFG, 12, train, eval_data=held_out,
                                  learning_rate=1e-3, eval_batches=2, stats_batches=2,
                                  checkpoint_every=6, async_checkpoints=False)
    final = summary["export_dir"]
    assert load_head(final) == "score"
    cfg, params = load_params(final)
    assert set(params) == {"model", "score"} and cfg == CFG
    stats = json.load(open(os.path.join(final, reward.STATS_FILE)))
    assert stats["count"] == 2 * 2 * 8 and stats["std"] > 0
    assert 0.0 <= summary["final_eval"]["accuracy"] <= 1.0
    assert sorted(os.listdir(tmp_path / "reward" / "checkpoints")) == ["12", "6"]
