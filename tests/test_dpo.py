"""DPO: the loss against NumPy, log 2 at the reference, and the job end to end: the cached
reference log-probs, resume, the checkpoint's tokenizer, and the stage's skip / refuse /
overwrite through gin/runs/dpo.gin."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import numpy_response_logprobs

from xwin_jax import launch
from xwin_jax.checkpoints.params import load_params, save_params
from xwin_jax.data import synthetic
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.data.vocabulary import ByteVocabulary, load_vocabulary
from xwin_jax.models import llama
from xwin_jax.train import dpo
from xwin_jax.train.stage import StageChanged
from xwin_jax.train.state import OptimizerConfig

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
PARAMS = llama.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    suite = synthetic.write_suite(str(root / "suite"), seed=0, num_prompts=200)
    save_params(str(root / "policy"), CFG, PARAMS, vocabulary=ByteVocabulary())
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
    batch = PairsData([pairs], seq_len=320, batch_size=2, vocabulary="bytes").global_batch(0)
    tokens, mask = batch["chosen_tokens"], batch["chosen_response_mask"]
    got = np.asarray(dpo.sequence_logprobs(CFG, PARAMS, tokens, mask))
    np.testing.assert_allclose(got, numpy_response_logprobs(CFG, PARAMS, tokens, mask),
                               rtol=1e-4)


def test_the_objective_adds_sft_weight_times_the_chosen_mean_token_nll(setup):
    _, pairs = setup
    batch = PairsData([pairs], seq_len=320, batch_size=3, vocabulary="bytes").global_batch(0)
    chosen = np.asarray(dpo.sequence_logprobs(CFG, PARAMS, batch["chosen_tokens"],
                                              batch["chosen_response_mask"]))
    tokens = batch["chosen_response_mask"][:, 1:].sum(axis=1)
    # Reference = policy on the chosen side, 0 on the rejected one: h = -log pi(rejected).
    batch["chosen_ref_logp"] = chosen
    batch["rejected_ref_logp"] = np.zeros(3, np.float32)
    plain = dpo.dpo_loss_fn(CFG, beta=0.1)(PARAMS, batch)
    with_sft = dpo.dpo_loss_fn(CFG, beta=0.1, sft_weight=0.5)(PARAMS, batch)
    nll = np.sum(-chosen / tokens)
    assert plain.count_name == "num_pairs" and float(plain.count) == 3
    np.testing.assert_allclose(float(with_sft.sums["chosen_nll"]), nll, rtol=1e-4)
    np.testing.assert_allclose(float(with_sft.objective),
                               float(with_sft.sums["dpo_loss"]) + 0.5 * nll, rtol=1e-4)
    np.testing.assert_allclose(float(with_sft.sums["dpo_loss"]), float(plain.objective),
                               rtol=1e-6)
    assert float(with_sft.sums["chosen_reward"]) == pytest.approx(0.0, abs=1e-4)
    # The logged loss is the objective per pair: what the gradient minimises.
    np.testing.assert_allclose(float(with_sft.means()["loss"]), float(with_sft.objective) / 3,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="'sigmoid', 'ipo'"):
        dpo.dpo_loss_fn(CFG, loss_type="hinge")


def test_train_dpo_starts_at_log2_caches_the_reference_learns_and_resumes(setup, tmp_path,
                                                                          capsys):
    root, pairs = setup

    def run():
        return dpo.train_dpo(str(tmp_path), CFG, 12, PairsData([pairs], seq_len=320,
                                                               batch_size=8),
                             init_dir=str(root / "policy"),
                             optimizer=OptimizerConfig(learning_rate=1e-3), beta=0.5,
                             checkpoint_every=6, async_checkpoints=False)

    summary = run()
    stage = tmp_path / "dpo"
    with open(stage / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "train/loss" in r]
    # The first step's loss is computed at the reference itself.
    np.testing.assert_allclose(records[0]["train/loss"], np.log(2.0), rtol=1e-5)
    assert records[0]["train/chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    late = np.mean([r["train/margin"] for r in records[-4:]])
    assert late > 0.05, late  # the implicit reward margin grows on the training pairs
    # No vocabulary given: the policy's (bytes), recorded with the export.
    assert load_vocabulary(summary["export_dir"]) == ByteVocabulary()
    cfg, params = load_params(summary["export_dir"])
    assert cfg == CFG
    # The reference log-probs are cached and match a fresh computation at the policy init.
    cached = dict(np.load(stage / dpo.REFERENCE_FILE))
    first = PairsData([pairs], seq_len=320, batch_size=8, vocabulary="bytes").arrays
    chosen, rejected = dpo.pair_logprobs(CFG, PARAMS, {k: v[:3] for k, v in first.items()})
    np.testing.assert_allclose(cached["chosen_ref_logp"][:3], chosen, rtol=1e-5)
    np.testing.assert_allclose(cached["rejected_ref_logp"][:3], rejected, rtol=1e-5)

    # Killed after the step-6 checkpoint, with a cache that does not match its record: the
    # cache is recomputed, and the same command resumes to the same export.
    for name in ("summary.json", "final", "checkpoints/12"):
        shutil.rmtree(stage / name) if os.path.isdir(stage / name) else os.remove(stage / name)
    np.savez(stage / dpo.REFERENCE_FILE, **{**cached, "fingerprint": np.asarray("stale")})
    capsys.readouterr()
    resumed = run()
    assert "recomputing" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == 6
    jax.tree.map(np.testing.assert_array_equal, load_params(resumed["export_dir"])[1], params)
    recomputed = dict(np.load(stage / dpo.REFERENCE_FILE))
    np.testing.assert_array_equal(recomputed["chosen_ref_logp"], cached["chosen_ref_logp"])
    assert str(recomputed["fingerprint"]) == str(cached["fingerprint"])


def test_dpo_gin_run_skips_refuses_a_retrained_policy_and_overwrites(setup, tmp_path,
                                                                     capsys):
    _, pairs = setup
    policy = tmp_path / "policy"
    save_params(str(policy), CFG, PARAMS, vocabulary=ByteVocabulary())
    files = ["models/tiny.gin", "mesh/single.gin", "runs/dpo.gin"]
    bindings = [f"WORKDIR = '{tmp_path}'", "TRAIN_STEPS = 1", "BATCH_SIZE = 8",
                "SEQ_LEN = 320", f"TRAIN_PAIRS = ['{pairs}']", f"POLICY_DIR = '{policy}'",
                "dpo.train_dpo.async_checkpoints = False"]
    first = launch.run_gin_job(files, bindings)  # the architecture comes from POLICY_DIR
    assert load_params(first["export_dir"])[0] == CFG
    assert first["final_metrics"]["learning_rate"] == pytest.approx(5e-7)  # the default
    capsys.readouterr()
    assert launch.run_gin_job(files, bindings) == first
    assert "[dpo] already finished" in capsys.readouterr().out

    # Another policy in the same directory: the same path, other contents.
    retrained = jax.tree.map(lambda x: x + 1e-3, PARAMS)
    save_params(str(policy), CFG, retrained, vocabulary=ByteVocabulary())
    with pytest.raises(StageChanged, match=r"start\.checkpoint\.params: ") as err:
        launch.run_gin_job(files, bindings)
    assert "overwrite=True" in err.value.hint
    rerun = launch.run_gin_job(files, bindings + ["jobs.run.overwrite = True"])
    assert rerun["fingerprint"] != first["fingerprint"]
    # The reference log-probs are the retrained policy's.
    cached = np.load(tmp_path / "dpo" / dpo.REFERENCE_FILE)
    arrays = PairsData([pairs], seq_len=320, batch_size=8, vocabulary="bytes").arrays
    chosen, _ = dpo.pair_logprobs(CFG, retrained, {k: v[:2] for k, v in arrays.items()})
    np.testing.assert_allclose(cached["chosen_ref_logp"][:2], chosen, rtol=1e-5)


def test_dpo_needs_a_starting_policy(setup, tmp_path):
    _, pairs = setup
    with pytest.raises(ValueError, match="init_dir"):
        dpo.train_dpo(str(tmp_path), CFG, 1, PairsData([pairs], seq_len=320, batch_size=8))
