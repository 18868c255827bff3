"""DPO: the loss against NumPy, log 2 at the reference, and the job end to end."""

import json
import os

import jax
import numpy as np
import pytest

from xwin_jax.checkpoints.params import load_params, save_params
from xwin_jax.data import synthetic
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.models import llama
from xwin_jax.train import dpo

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    suite = synthetic.write_suite(str(root / "suite"), seed=0, num_prompts=200)
    save_params(str(root / "policy"), CFG, llama.init_params(CFG, jax.random.key(0)))
    return root, suite["pairs_train"]


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 3 for _ in range(4))
    h = (pc - rc) - (pr - rr)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(dpo.dpo_losses(pc, pr, rc, rr, 0.1), -log_sigmoid(0.1 * h),
                               rtol=1e-5)
    np.testing.assert_allclose(dpo.dpo_losses(pc, pr, rc, rr, 0.1, label_smoothing=0.2),
                               -0.8 * log_sigmoid(0.1 * h) - 0.2 * log_sigmoid(-0.1 * h),
                               rtol=1e-5)
    np.testing.assert_allclose(dpo.dpo_losses(pc, pr, rc, rr, 0.1, "ipo"), (h - 5.0) ** 2,
                               rtol=1e-5)
    # Policy = reference: sigmoid DPO is log 2 whatever the pair.
    np.testing.assert_allclose(dpo.dpo_losses(pc, pr, pc, pr, 0.1), np.log(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="hinge"):
        dpo.dpo_losses(pc, pr, rc, rr, 0.1, "hinge")


def test_sequence_logprobs_sum_the_response_tokens(setup):
    _, pairs = setup
    batch = PairsData([pairs], seq_len=320, batch_size=2).global_batch(0)
    params = llama.init_params(CFG, jax.random.key(0))
    tokens, mask = batch["chosen_tokens"], batch["chosen_response_mask"]
    got = np.asarray(dpo.sequence_logprobs(CFG, params, tokens, mask))
    logits = np.asarray(llama.Llama(CFG).apply({"params": params}, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for r in range(2):
        expected = sum(logp[r, t - 1, tokens[r, t]] for t in range(1, tokens.shape[1])
                       if mask[r, t])
        np.testing.assert_allclose(got[r], expected, rtol=1e-4)


def test_train_dpo_starts_at_log2_caches_the_reference_and_learns(setup, tmp_path):
    root, pairs = setup
    data = lambda: PairsData([pairs], seq_len=320, batch_size=8)  # noqa: E731
    summary = dpo.train_dpo(str(tmp_path), CFG, 12, data(), init_params_dir=str(root / "policy"),
                            learning_rate=1e-3, beta=0.5, checkpoint_every=6,
                            async_checkpoints=False)
    with open(tmp_path / "dpo" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "train/loss" in r]
    # The first step's loss is computed at the reference itself.
    np.testing.assert_allclose(records[0]["train/loss"], np.log(2.0), rtol=1e-5)
    assert records[0]["train/chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    late = np.mean([r["train/margin"] for r in records[-4:]])
    assert late > 0.05, late  # the implicit reward margin grows on the training pairs
    assert load_params(summary["export_dir"])[0] == CFG
    # The reference log-probs are cached and match a fresh computation at the policy init.
    cached = np.load(tmp_path / "dpo" / dpo.REFERENCE_FILE)
    params = load_params(str(root / "policy"))[1]
    first = data().arrays
    chosen, _ = dpo.pair_logprobs(CFG, params, {k: v[:3] for k, v in first.items()})
    np.testing.assert_allclose(cached["chosen_ref_logp"][:3], chosen, rtol=1e-5)
    os.remove(tmp_path / "dpo" / "summary.json")
    with pytest.raises(ValueError, match="other pairs"):
        dpo.train_dpo(str(tmp_path), CFG, 12, _fewer_pairs(pairs, tmp_path),
                      init_params_dir=str(root / "policy"))


def test_a_reference_retrained_into_the_same_directory_is_not_taken_for_the_old(setup,
                                                                                 tmp_path):
    root, pairs = setup
    policy = tmp_path / "policy"
    params = llama.init_params(CFG, jax.random.key(0))
    save_params(str(policy), CFG, params)
    data = lambda: PairsData([pairs], seq_len=320, batch_size=8)  # noqa: E731
    kwargs = dict(init_params_dir=str(policy), learning_rate=1e-3, async_checkpoints=False)
    dpo.train_dpo(str(tmp_path / "run"), CFG, 1, data(), **kwargs)
    os.remove(tmp_path / "run" / "dpo" / "summary.json")  # a run that had not finished
    save_params(str(policy), CFG, params)  # the same weights saved again: the cache holds
    assert dpo.train_dpo(str(tmp_path / "run"), CFG, 1, data(), **kwargs)["steps"] == 1
    os.remove(tmp_path / "run" / "dpo" / "summary.json")
    retrained = jax.tree.map(lambda x: x + 1e-3, params)  # same path, same shapes, new values
    save_params(str(policy), CFG, retrained)
    with pytest.raises(ValueError, match="reference policy") as err:
        dpo.train_dpo(str(tmp_path / "run"), CFG, 1, data(), **kwargs)
    assert "new WORKDIR" in err.value.hint


def _fewer_pairs(pairs, tmp_path):
    path = tmp_path / "fewer.jsonl"
    with open(pairs) as f, open(path, "w") as out:
        out.writelines(f.readlines()[:20])
    return PairsData([str(path)], seq_len=320, batch_size=8)


def test_dpo_needs_a_starting_policy(setup, tmp_path):
    _, pairs = setup
    with pytest.raises(ValueError, match="init_params_dir"):
        dpo.train_dpo(str(tmp_path), CFG, 1, PairsData([pairs], seq_len=320, batch_size=8))


def test_sft_weight_adds_the_chosen_mean_token_nll(setup):
    _, pairs = setup
    batch = PairsData([pairs], seq_len=320, batch_size=3).global_batch(0)
    params = llama.init_params(CFG, jax.random.key(0))
    batch["chosen_ref_logp"] = np.zeros(3, np.float32)
    batch["rejected_ref_logp"] = np.zeros(3, np.float32)
    plain, sums = dpo.dpo_loss_fn(CFG, beta=0.1)(params, batch)
    with_sft, _ = dpo.dpo_loss_fn(CFG, beta=0.1, sft_weight=0.5)(params, batch)
    chosen = np.asarray(dpo.sequence_logprobs(CFG, params, batch["chosen_tokens"],
                                              batch["chosen_response_mask"]))
    tokens = batch["chosen_response_mask"][:, 1:].sum(axis=1)
    np.testing.assert_allclose(float(with_sft) - float(plain), 0.5 * np.sum(-chosen / tokens),
                               rtol=1e-4)
    np.testing.assert_allclose(float(sums["chosen_nll_sum"]), np.sum(-chosen / tokens),
                               rtol=1e-4)
