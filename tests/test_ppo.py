"""PPO: the rollout, the advantages and values against references, its first update, the
stage runner's skip / refuse / overwrite, the policy's vocabulary, and bit-identical resume."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eos_biased_policy, write_policy_and_reward
from test_rl import numpy_gae  # the NumPy loop rl.gae is tested against

from xwin_jax import jobs, sampling
from xwin_jax.errors import ConfigError
from xwin_jax.checkpoints.params import load_params
from xwin_jax.data import formats
from xwin_jax.data.prompts_data import PromptsData
from xwin_jax.data.vocabulary import ByteVocabulary, SentencePieceVocabulary, load_vocabulary
from xwin_jax.models import heads, llama
from xwin_jax.models.llama import Llama, positions_from_mask
from xwin_jax.partitioning import Partitioner
from xwin_jax.rewards import RewardStats, raw_scores
from xwin_jax.train import ppo, rollout
from xwin_jax.train import state as train_state
from xwin_jax.train.stage import FINGERPRINT_FILE, SUMMARY_FILE, StageChanged

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
PROMPT_LEN = 96
BYTES = ByteVocabulary()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    write_policy_and_reward(root, CFG, BYTES)
    formats.write_jsonl(str(root / "prompts.jsonl"),
                        [{"prompt": f"Say {w} {i}."} for i, w in enumerate(["a", "bb", "ccc"] * 4)])
    return root


def run(checkpoints, workdir, steps, learning_rate=1e-3, value_learning_rate=2e-3,
        models=None, time_phases=True, max_prompt_len=PROMPT_LEN, bucket_multiple=64,
        **ppo_overrides):
    prompts = PromptsData([str(checkpoints / "prompts.jsonl")], max_prompt_len=max_prompt_len,
                          batch_size=4, bucket_multiple=bucket_multiple)
    config = dict(max_new_tokens=8, epochs=2, num_minibatches=2, temperature=0.7,
                  kl_coef=0.05)
    config.update(ppo_overrides)
    models = models or checkpoints
    optimizer = lambda lr: train_state.OptimizerConfig(  # noqa: E731
        learning_rate=lr, decay="constant", eps=1e-5)
    return ppo.train_ppo(str(workdir), CFG, steps, prompts,
                         policy_dir=str(models / "policy"), reward_dir=str(models / "rm"),
                         ppo=ppo.PPOConfig(**config), policy_optimizer=optimizer(learning_rate),
                         value_optimizer=optimizer(value_learning_rate),
                         partitioner=Partitioner({"data": 1, "fsdp": 2, "tensor": 1}),
                         checkpoint_every=1, async_checkpoints=False,
                         time_phases=time_phases)


def metrics(workdir):
    with open(os.path.join(workdir, "ppo", "metrics.jsonl")) as f:
        return [{k[len("train/"):]: v for k, v in r.items() if k.startswith("train/")}
                for r in map(json.loads, f) if "train/loss" in r]


def leaves(directory):
    return jax.tree.leaves(load_params(str(directory))[1])


@pytest.fixture(scope="module")
def two_iterations(checkpoints, tmp_path_factory):
    """(summary, workdir) of a 2-iteration run."""
    workdir = tmp_path_factory.mktemp("two")
    return run(checkpoints, workdir, 2), workdir


def test_first_iterations(checkpoints, two_iterations):
    summary, workdir = two_iterations
    first, second = metrics(workdir)
    # Iteration 1: the policy is the reference, and the first minibatch sees the very params
    # that produced the old log-probs.
    assert abs(first["kl"]) < 1e-6 and abs(first["kl_k3"]) < 1e-6
    assert abs(first["first_ratio_mean"] - 1.0) < 1e-5
    # Log-probs under logits / temperature match what the sampler drew from.
    assert first["sampler_logprob_gap"] < 1e-4
    # The learning rates come from the two (constant) schedules; beta is fixed.
    assert first["learning_rate"] == pytest.approx(1e-3) == second["learning_rate"]
    assert first["value_learning_rate"] == pytest.approx(2e-3)
    assert first["kl_beta"] == pytest.approx(0.05) == summary["final_kl_beta"]
    assert 1.0 <= first["response_length"] <= 8.0
    prompts = PromptsData([str(checkpoints / "prompts.jsonl")], PROMPT_LEN, 4, BYTES)
    prompt_tokens = sum(len(prompts.ids[i]) for i in prompts.rows(0))
    assert first["num_input_tokens"] == prompt_tokens + 4 * first["response_length"]
    assert first["rollout_fraction"] == pytest.approx(first["time_rollout_s"] / (
        first["time_rollout_s"] + first["time_scoring_s"] + first["time_update_s"]))
    # After an iteration of updates the policy differs from the reference: KL k3 > 0.
    assert second["kl_k3"] > 0
    assert any(not np.allclose(a, b) for a, b in zip(leaves(summary["export_dir"]),
                                                     leaves(checkpoints / "policy")))
    assert load_params(summary["value_export_dir"])[0] == CFG
    # Both exports carry the tokenizer, the value model its affine map too.
    assert load_vocabulary(summary["export_dir"]) == BYTES
    assert load_vocabulary(summary["value_export_dir"]) == BYTES
    assert RewardStats.load(summary["value_export_dir"]) == RewardStats(0.1, 2.0)


def test_a_rerun_skips_other_settings_are_refused_and_overwrite_reruns(
        checkpoints, two_iterations, tmp_path, capsys):
    summary, finished = two_iterations
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    # The same command again: already finished, nothing runs.
    capsys.readouterr()
    assert run(checkpoints, tmp_path, 2) == summary
    assert "[ppo] already finished" in capsys.readouterr().out
    # Another learning rate: refused, naming it.
    with pytest.raises(StageChanged, match=r"policy_optimizer\.learning_rate: 0\.001 → 0\.002"):
        run(checkpoints, tmp_path, 2, learning_rate=2e-3)
    # With overwrite the stage runs again with it.
    again = jobs.run(lambda: run(checkpoints, tmp_path, 1, learning_rate=2e-3), None,
                     overwrite=True)
    assert again["fingerprint"] != summary["fingerprint"] and again["steps"] == 1
    assert [m["learning_rate"] for m in metrics(tmp_path)] == [pytest.approx(2e-3)]


def naive_samples(params, tokens, mask, keys, temperature, max_new_tokens, eos):
    """Rows sampled token by token with full forward passes over a right-padded buffer (no KV
    cache; causal attention never sees the empty slots): the sampler's key for new token t of
    a row is fold_in(row key, t)."""
    forward = jax.jit(lambda t, m: Llama(CFG).apply(
        {"params": params}, t, positions=positions_from_mask(m), segment_ids=m))
    width = tokens.shape[1]
    tokens = np.concatenate([tokens, np.zeros((len(tokens), max_new_tokens), np.int32)], 1)
    mask = np.concatenate([mask, np.zeros((len(mask), max_new_tokens), np.int32)], 1)
    new = [[] for _ in tokens]
    logps = [[] for _ in tokens]
    for t in range(max_new_tokens):
        logits = np.asarray(forward(tokens, mask))[:, width - 1 + t] / temperature
        for r in range(len(tokens)):
            if new[r] and new[r][-1] == eos:
                continue
            token = int(jax.random.categorical(jax.random.fold_in(keys[r], t), logits[r]))
            logps[r].append(float(jax.nn.log_softmax(logits[r])[token]))
            new[r].append(token)
            tokens[r, width + t], mask[r, width + t] = token, 1
    return new, logps


def test_a_rollout_is_the_policys_sample_with_its_keys():
    params = eos_biased_policy(CFG)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 200, size=n)) for n in (5, 9, 2, 7)]
    batch = {"tokens": np.zeros((4, 10), np.int32), "mask": np.zeros((4, 10), np.int32)}
    for r, ids in enumerate(prompts):  # left padding
        batch["tokens"][r, 10 - len(ids):], batch["mask"][r, 10 - len(ids):] = ids, 1
    rollout_fn = jax.jit(ppo.make_rollout_fn(CFG, 8, mode="sample", stop_ids=(BYTES.eos_id,),
                                             pad_id=BYTES.pad_id, seed=3))
    # The rollout of iteration 3 at a traced temperature of 0.7.
    rows = jax.device_get(rollout_fn(params, batch, 3, sampling.Settings(0.7, 0, 1.0)))
    new, logps = naive_samples(params, batch["tokens"], batch["mask"],
                               jax.random.split(jax.random.fold_in(jax.random.key(3), 3), 4),
                               0.7, 8, BYTES.eos_id)
    np.testing.assert_allclose(rows["temperature"], 0.7)
    for r in range(4):
        n = len(new[r])
        np.testing.assert_array_equal(rows["tokens"][r], list(batch["tokens"][r]) + new[r]
                                      + [BYTES.pad_id] * (8 - n))
        np.testing.assert_array_equal(rows["response_mask"][r], [1] * n + [0] * (8 - n))
        np.testing.assert_array_equal(rows["mask"][r], list(batch["mask"][r]) + [1] * n
                                      + [0] * (8 - n))
        assert rows["finished"][r] == (new[r][-1] == BYTES.eos_id)
        np.testing.assert_allclose(rows["sampler_logprobs"][r, :n], logps[r], atol=1e-5)
    assert rows["finished"].any() and not rows["finished"].all()  # both kinds of rows seen


def test_advantages_match_a_numpy_gae_with_kl_rewards_and_the_eos_penalty():
    rng = np.random.default_rng(1)
    lengths = np.array([6, 3, 1, 5])
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)
    logp, ref_logp, values = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
    scores = np.array([1.5, -0.5, 2.0, 0.3], np.float32)
    finished = np.array([True, True, False, True])
    cfg = ppo.PPOConfig(kl_coef=0.1, missing_eos_score=-3.0, gamma=0.9, lam=0.8,
                        whiten_advantages=False)
    out = ppo.advantages(cfg, scores, finished, logp, ref_logp, values, mask, 0.1)
    used = np.where(finished, scores, -3.0)
    rewards = -0.1 * (logp - ref_logp) * mask
    rewards[np.arange(4), lengths - 1] += used
    adv, returns = numpy_gae(rewards.astype(np.float64), values * mask, lengths, 0.9, 0.8)
    np.testing.assert_allclose(out["scores"], used)
    np.testing.assert_allclose(out["advantages"], adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["kl_k1"], ((logp - ref_logp) * mask).sum(1).mean(),
                               rtol=1e-5)
    whitened = ppo.advantages(dataclasses.replace(cfg, whiten_advantages=True), scores, finished,
                              logp, ref_logp, values, mask, 0.1)["advantages"]
    real = adv[mask > 0]
    np.testing.assert_allclose(np.asarray(whitened)[mask > 0],
                               (real - real.mean()) / np.sqrt(real.var() + 1e-8), rtol=1e-4,
                               atol=1e-5)


def update_inputs():
    optimizer = train_state.OptimizerConfig(learning_rate=1e-2, eps=1e-5).build(10)
    policy = train_state.init_state(llama.init_params(CFG, jax.random.key(0)), optimizer[0])
    value = train_state.init_state(heads.init_reward_params(CFG, jax.random.key(1)),
                                   optimizer[0])
    rng = np.random.default_rng(0)
    b, p, t = 2, 6, 5
    tokens = rng.integers(3, 200, size=(b, p + t)).astype(np.int32)
    mask = np.ones((b, p + t), np.int32)
    mask[0, :2] = 0  # left padding
    response_mask = np.ones((b, t), np.float32)
    response_mask[1, 3:] = 0
    logp, _ = rollout.response_logprobs(CFG, policy.params, tokens, mask, p, 0.7)
    batch = {"tokens": tokens, "mask": mask, "response_mask": response_mask,
             "temperature": np.full((b,), 0.7, np.float32), "old_logp": np.asarray(logp),
             "advantages": np.zeros((b, t), np.float32),
             "old_values": np.zeros((b, t), np.float32),
             "returns": rng.normal(size=(b, t)).astype(np.float32)}
    return optimizer, policy, value, batch, p


def test_zero_advantages_leave_the_policy_unchanged_while_the_value_learns():
    optimizer, policy, value, batch, p = update_inputs()
    step = jax.jit(ppo.make_update_step(CFG, CFG, ppo.PPOConfig(), optimizer, optimizer))
    new_policy, new_value, stats = step(policy, value, batch)
    for before, after in zip(jax.tree.leaves(policy.params), jax.tree.leaves(new_policy.params)):
        np.testing.assert_array_equal(before, after)
    assert float(stats["grad_norm"]) == 0.0 and float(stats["loss"]) == 0.0
    assert float(stats["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["learning_rate"]) == float(stats["value_learning_rate"]) == np.float32(1e-2)
    assert float(stats["num_response_tokens"]) == 8.0 and float(stats["update_finite"]) == 1.0
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(value.params),
                                                        jax.tree.leaves(new_value.params)))


def test_values_are_the_score_of_each_prefix_in_normalised_units():
    params = heads.init_reward_params(CFG, jax.random.key(1))
    tokens = np.arange(3, 3 + 2 * 9, dtype=np.int32).reshape(2, 9)
    mask = np.ones((2, 9), np.int32)
    mask[1, :2] = 0  # left padding
    values_of = jax.jit(ppo.values_fn(CFG, RewardStats(0.5, 4.0)), static_argnums=3)
    values = values_of(params, tokens, mask, 5)
    # The value before response token t is the score model's reading of the row up to the
    # position that predicts it (P - 1 + t; later tokens masked out), mapped like the rewards.
    score = jax.jit(lambda p, m: raw_scores(CFG, p, tokens, m))
    for t in range(4):
        prefix = score(params, mask * (np.arange(9) < 5 + t))
        np.testing.assert_allclose(values[:, t], (np.asarray(prefix) - 0.5) / 4.0, rtol=1e-5,
                                   atol=1e-6)
    # A head that reads nothing gives exactly the value of a raw score of 0.
    params["score"]["kernel"] = jnp.zeros_like(params["score"]["kernel"])
    zero = values_of(params, tokens, mask, 5)
    np.testing.assert_array_equal(zero, np.full((2, 4), -0.125, np.float32))


def test_with_learning_rate_zero_and_the_checkpoints_tokenizer_the_policy_stays_bit_identical(
        checkpoints, tmp_path):
    """No vocabulary is given: the prompts are tokenized with the one POLICY_DIR records (a
    SentencePiece model here), which both exports carry on."""
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"USER: Say {w} {i}. ASSISTANT: {w} {i}"
                                for i in range(40) for w in ("a", "bb", "ccc")))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
        model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    vocab = SentencePieceVocabulary(str(tmp_path / "sp.model"))
    write_policy_and_reward(tmp_path, CFG, vocab)
    summary = run(checkpoints, tmp_path / "w", 2, learning_rate=0.0, models=tmp_path)
    for a, b in zip(leaves(summary["export_dir"]), leaves(tmp_path / "policy")):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(summary["value_export_dir"]),
                                                        leaves(tmp_path / "rm")))
    # The policy never moves: its KL to the reference stays 0 at every iteration.
    assert all(abs(m["kl"]) < 1e-6 for m in metrics(tmp_path / "w"))
    assert load_vocabulary(summary["export_dir"]) == vocab
    recorded = json.load(open(tmp_path / "w" / "ppo" / FINGERPRINT_FILE))["fingerprint"]
    assert recorded["prompts"]["vocabulary"] == vocab.fingerprint()
    assert recorded["policy"]["vocabulary"] == vocab.fingerprint()
    # A reward model trained on another tokenizer would read the policy's ids as other text.
    prompts = PromptsData([str(checkpoints / "prompts.jsonl")], PROMPT_LEN, 4)
    with pytest.raises(ConfigError, match="REWARD_DIR=.* records another tokenizer"):
        ppo.train_ppo(str(tmp_path / "other"), CFG, 1, prompts,
                      policy_dir=str(checkpoints / "policy"), reward_dir=str(tmp_path / "rm"))


def test_a_killed_run_resumes_bit_identical_to_an_uninterrupted_one(
        checkpoints, two_iterations, tmp_path):
    whole, whole_dir = two_iterations
    # Killed (kill -9) after iteration 2 was logged but before its checkpoint was written:
    # iteration 1's checkpoint is the latest, nothing marks the stage finished.
    shutil.copytree(whole_dir, tmp_path, dirs_exist_ok=True)
    stage_dir = tmp_path / "ppo"
    for name in ("checkpoints/2", "final", "final_value"):
        shutil.rmtree(stage_dir / name)
    os.remove(stage_dir / SUMMARY_FILE)
    resumed = run(checkpoints, tmp_path, 2)
    assert resumed["resumed_from_step"] == 1
    for name in ("export_dir", "value_export_dir"):
        for a, b in zip(leaves(whole[name]), leaves(resumed[name])):
            np.testing.assert_array_equal(a, b)
    timing = ("time_rollout_s", "time_scoring_s", "time_update_s", "rollout_fraction",
              "step_time_s", "tokens_per_s")
    untimed = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert untimed(metrics(tmp_path)[-1]) == untimed(metrics(whole_dir)[-1])


def test_an_iteration_reads_the_devices_once(checkpoints, tmp_path, monkeypatch):
    """Rollout, scoring and every update run on the devices; an iteration's only transfer to
    the host is the one read of its metrics (implicit transfers are refused)."""
    reads, real_get, iteration = [], jax.device_get, ppo.PPOPhases.iteration

    def counting_get(tree):
        reads.append(1)
        return real_get(tree)

    def guarded(self, *args, **kwargs):
        monkeypatch.setattr(jax, "device_get", counting_get)
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                return iteration(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(jax, "device_get", real_get)

    monkeypatch.setattr(ppo.PPOPhases, "iteration", guarded)
    run(checkpoints, tmp_path, 2, time_phases=False)
    assert len(reads) == 2
    assert "time_rollout_s" not in metrics(tmp_path)[0]


def test_bucketed_prompts_give_the_unbucketed_result(checkpoints, tmp_path):
    """Prompts padded to their bucket (64) rather than max_prompt_len (192): the same
    samples, metrics and parameters, up to the rounding of the shorter sums."""
    bucketed = run(checkpoints, tmp_path / "bucketed", 1, max_prompt_len=192)
    padded = run(checkpoints, tmp_path / "padded", 1, max_prompt_len=192, bucket_multiple=None)
    for name in ("export_dir", "value_export_dir"):
        for a, b in zip(leaves(bucketed[name]), leaves(padded[name])):
            np.testing.assert_allclose(a, b, atol=1e-5)
    (short,), (long,) = metrics(tmp_path / "bucketed"), metrics(tmp_path / "padded")
    assert short["response_length"] == long["response_length"]
    for name in ("score", "kl_k3", "loss", "value_loss", "sampler_logprob_gap"):
        assert short[name] == pytest.approx(long[name], rel=1e-4, abs=1e-5), name


def test_a_non_finite_update_stops_ppo_before_anything_is_saved(checkpoints, tmp_path):
    with pytest.raises(ppo.NonFiniteError, match=r"iteration 1, update 1 of 4: the update "
                                                 r"made the parameters") as err:
        run(checkpoints, tmp_path, 2, learning_rate=1e39)  # overflows float32: inf
    assert "LEARNING_RATE" in err.value.hint
    assert not any((tmp_path / "ppo" / "checkpoints").iterdir())
    assert not (tmp_path / "ppo" / "final").exists()


def test_a_batch_that_does_not_split_into_minibatches_names_the_valid_multiple(checkpoints,
                                                                              tmp_path):
    with pytest.raises(ValueError, match="BATCH_SIZE=4 does not split") as err:
        run(checkpoints, tmp_path, 1, num_minibatches=3)
    assert "multiple of 6" in err.value.hint and "num_minibatches" in err.value.hint
    assert not (tmp_path / "ppo").exists()  # refused before the stage starts
