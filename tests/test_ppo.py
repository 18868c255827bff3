"""PPO: the invariants of its first update, zero advantages, KL to itself, resume."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xwin_jax.checkpoints.params import load_params, save_params
from xwin_jax.data import formats
from xwin_jax.data.prompts_data import PromptsData
from xwin_jax.models import heads, llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import ppo, rollout
from xwin_jax.train import state as train_state

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
PROMPT_LEN = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    save_params(str(root / "policy"), CFG, llama.init_params(CFG, jax.random.key(0)))
    save_params(str(root / "rm"), CFG, heads.init_reward_params(CFG, jax.random.key(1)),
                head="score")
    with open(root / "rm" / "reward_stats.json", "w") as f:
        json.dump({"mean": 0.1, "std": 2.0}, f)
    formats.write_jsonl(str(root / "prompts.jsonl"),
                        [{"prompt": f"Say {w} {i}."} for i, w in enumerate(["a", "bb", "ccc"] * 4)])
    return root


def run(checkpoints, workdir, steps, learning_rate=1e-3, **ppo_overrides):
    prompts = PromptsData([str(checkpoints / "prompts.jsonl")], max_prompt_len=PROMPT_LEN,
                          batch_size=4)
    config = dict(max_new_tokens=8, epochs=2, num_minibatches=2, temperature=0.7,
                  kl_coef=0.05)
    config.update(ppo_overrides)
    return ppo.train_ppo(str(workdir), CFG, steps, prompts,
                         policy_dir=str(checkpoints / "policy"), reward_dir=str(checkpoints / "rm"),
                         ppo=ppo.PPOConfig(**config), learning_rate=learning_rate,
                         value_learning_rate=1e-3, partitioner=Partitioner(
                             {"data": 1, "fsdp": 2, "tensor": 1}),
                         checkpoint_every=1, async_checkpoints=False)


def metrics(workdir):
    with open(os.path.join(workdir, "ppo", "metrics.jsonl")) as f:
        return [{k[len("train/"):]: v for k, v in r.items() if k.startswith("train/")}
                for r in map(json.loads, f) if "train/loss" in r]


def test_first_update_ratio_is_one_kl_to_itself_zero_and_policy_moves(checkpoints, tmp_path):
    summary = run(checkpoints, tmp_path, 2)
    first, second = metrics(tmp_path)[:2]
    # Iteration 1: the policy is the reference, and the first minibatch sees the very params
    # that produced the old log-probs.
    assert abs(first["kl"]) < 1e-6 and abs(first["kl_k3"]) < 1e-6
    assert abs(first["first_ratio_mean"] - 1.0) < 1e-5
    # Log-probs under logits / temperature match what the sampler drew from.
    assert first["sampler_logprob_gap"] < 1e-4
    for key in ("score", "entropy", "clip_fraction", "approx_kl", "value_loss",
                "explained_variance", "response_length", "time_rollout_s", "time_scoring_s",
                "time_update_s", "rollout_fraction", "kl_beta"):
        assert np.isfinite(first[key]), key
    # After an iteration of updates the policy differs from the reference: KL k3 > 0.
    assert second["kl_k3"] > 0
    policy = load_params(summary["export_dir"])[1]
    start = load_params(str(checkpoints / "policy"))[1]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(policy),
                                                     jax.tree.leaves(start)))
    assert load_params(os.path.join(tmp_path, "ppo", "final_value"))[0] == CFG


def test_zero_advantages_leave_the_policy_unchanged():
    optimizer = train_state.make_optimizer(1e-2, eps=1e-5)
    policy = train_state.init_state(llama.init_params(CFG, jax.random.key(0)), optimizer)
    value = train_state.init_state(heads.init_reward_params(CFG, jax.random.key(1)), optimizer)
    rng = np.random.default_rng(0)
    b, p, t = 2, 6, 5
    tokens = rng.integers(3, 200, size=(b, p + t)).astype(np.int32)
    mask = np.ones((b, p + t), np.int32)
    mask[0, :2] = 0  # left padding
    response_mask = np.ones((b, t), np.float32)
    response_mask[1, 3:] = 0
    logp, _ = rollout.response_logprobs(CFG, policy.params, tokens, mask, p, 0.7)
    batch = {"tokens": tokens, "mask": mask, "response_mask": response_mask,
             "old_logp": np.asarray(logp), "advantages": np.zeros((b, t), np.float32),
             "old_values": np.zeros((b, t), np.float32),
             "returns": rng.normal(size=(b, t)).astype(np.float32)}
    step = jax.jit(ppo.make_update_step(CFG, CFG, ppo.PPOConfig(), p, optimizer, optimizer))
    new_policy, new_value, stats = step(policy, value, batch)
    for before, after in zip(jax.tree.leaves(policy.params), jax.tree.leaves(new_policy.params)):
        np.testing.assert_array_equal(before, after)
    assert float(stats["grad_norm"]) == 0.0
    # The value model still learns from the returns.
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(value.params),
                                                        jax.tree.leaves(new_value.params)))


def test_advantages_penalise_missing_eos_and_subtract_kl():
    cfg = ppo.PPOConfig(kl_coef=0.1, missing_eos_score=-3.0, whiten_advantages=False,
                        gamma=1.0, lam=1.0)
    mask = np.array([[1, 1, 1], [1, 1, 1]], np.float32)
    logp = np.log(np.full((2, 3), 0.5, np.float32))
    ref_logp = np.log(np.full((2, 3), 0.25, np.float32))
    values = np.zeros((2, 3), np.float32)
    out = ppo.advantages(cfg, jnp.array([2.0, 2.0]), jnp.array([True, False]), logp, ref_logp,
                         values, mask, 0.1)
    kl = np.log(2.0)
    np.testing.assert_allclose(out["scores"], [2.0, -3.0])
    # gamma = lam = 1, V = 0: the return at t = 0 is the whole sequence's reward.
    np.testing.assert_allclose(out["returns"][:, 0], [2.0 - 0.3 * kl, -3.0 - 0.3 * kl],
                               rtol=1e-5)
    np.testing.assert_allclose(out["kl_k1"], 3 * kl, rtol=1e-5)


def test_killed_run_resumes_to_the_same_policy(checkpoints, tmp_path):
    whole = run(checkpoints, tmp_path / "whole", 3)
    run(checkpoints, tmp_path / "split", 2)
    # Pretend the 2-iteration run was killed at its end: drop what marks it finished.
    os.remove(tmp_path / "split" / "ppo" / "summary.json")
    resumed = run(checkpoints, tmp_path / "split", 3)
    assert resumed["resumed_from_step"] == 2
    for a, b in zip(jax.tree.leaves(load_params(whole["export_dir"])[1]),
                    jax.tree.leaves(load_params(resumed["export_dir"])[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    shutil.rmtree(tmp_path)


def test_values_are_in_the_units_of_the_normalised_rewards():
    params = heads.init_reward_params(CFG, jax.random.key(1))
    tokens = np.arange(3, 3 + 2 * 9, dtype=np.int32).reshape(2, 9)
    mask = np.ones((2, 9), np.int32)
    raw = rollout.response_values(CFG, params, tokens, mask, 5)
    values = ppo.values_fn(CFG, 5, {"mean": 0.5, "std": 4.0})(params, tokens, mask)
    np.testing.assert_allclose(values, (np.asarray(raw) - 0.5) / 4.0, rtol=1e-6)
    # Read before each response token: position P - 1 + t of the per-token scores.
    per_token = heads.RewardModel(CFG).apply({"params": params}, tokens, mask, per_token=True)
    np.testing.assert_allclose(raw, np.asarray(per_token)[:, 4:8], rtol=1e-6)


def test_a_non_finite_update_stops_ppo_before_anything_is_saved(checkpoints, tmp_path):
    with pytest.raises(ppo.NonFiniteError, match=r"iteration 1, update 1 of 4: the update "
                                                 r"made the parameters") as err:
        run(checkpoints, tmp_path, 2, learning_rate=1e39)  # overflows float32: inf
    assert "learning_rate" in err.value.hint
    assert not any((tmp_path / "ppo" / "checkpoints").iterdir())
    assert not (tmp_path / "ppo" / "final").exists()


def test_a_batch_that_does_not_split_into_minibatches_names_the_valid_multiple(checkpoints,
                                                                              tmp_path):
    with pytest.raises(ValueError, match="BATCH_SIZE=4 does not split") as err:
        run(checkpoints, tmp_path, 1, num_minibatches=3)
    assert "multiple of 6" in err.value.hint and "num_minibatches" in err.value.hint
