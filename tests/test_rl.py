"""rl.py against straightforward NumPy loops on random masked inputs."""

import numpy as np
import pytest

from xwin_jax import rl

B, T = 5, 9


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    lengths = np.array([9, 4, 1, 6, 0])  # a full row, short rows and an empty one
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return {"mask": mask, "lengths": lengths,
            "a": rng.normal(size=(B, T)).astype(np.float32),
            "b": rng.normal(size=(B, T)).astype(np.float32),
            "values": rng.normal(size=(B, T)).astype(np.float32),
            "score": rng.normal(size=B).astype(np.float32)}


def test_masked_stats_and_whiten(arrays):
    x, mask = arrays["a"], arrays["mask"]
    chosen = x[mask > 0]
    np.testing.assert_allclose(rl.masked_mean(x, mask), chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, mask), chosen.var(), rtol=1e-5)  # biased
    white = np.asarray(rl.whiten(x, mask))
    np.testing.assert_allclose(white[mask > 0], (chosen - chosen.mean()) / np.sqrt(
        chosen.var() + 1e-8), rtol=1e-4, atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    kept = np.asarray(rl.whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(kept, (chosen - chosen.mean()) / np.sqrt(chosen.var() + 1e-8)
                               + chosen.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1)[:4],
                               [x[r, :n].mean() for r, n in enumerate(arrays["lengths"][:4])],
                               rtol=1e-5)
    assert float(rl.masked_mean(x, mask, axis=1)[4]) == 0.0


def test_kl_estimators(arrays):
    logp, ref = arrays["a"] - 3, arrays["b"] - 3
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2,
                               rtol=1e-5)
    ratio = np.exp(ref - logp)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), ratio - 1 - np.log(ratio),
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(rl.kl_penalty(logp, ref, "k3")) >= 0)
    assert np.all(np.asarray(rl.kl_penalty(logp, logp, "k1")) == 0)
    with pytest.raises(ValueError, match="k4"):
        rl.kl_penalty(logp, ref, "k4")


def test_token_rewards(arrays):
    mask, kl, score = arrays["mask"], arrays["a"], arrays["score"]
    expected = -0.1 * kl * mask
    for r, n in enumerate(arrays["lengths"]):
        if n:
            expected[r, n - 1] += score[r]
    np.testing.assert_allclose(rl.token_rewards(score, kl, mask, 0.1), expected, rtol=1e-5,
                               atol=1e-7)


def numpy_gae(rewards, values, lengths, gamma, lam):
    advantages = np.zeros_like(rewards)
    for r, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[r, t + 1] if t + 1 < n else 0.0
            delta = rewards[r, t] + gamma * next_value - values[r, t]
            last = delta + gamma * lam * last
            advantages[r, t] = last
    returns = (advantages + values) * (np.arange(rewards.shape[1]) < lengths[:, None])
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae(arrays, gamma, lam):
    rewards = arrays["a"] * arrays["mask"]
    advantages, returns = rl.gae(rewards, arrays["values"], arrays["mask"], gamma, lam)
    expected_adv, expected_ret = numpy_gae(rewards, arrays["values"], arrays["lengths"], gamma,
                                           lam)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_is_reward_to_go(arrays):
    """With gamma = lam = 1 the return is the plain sum of the remaining rewards."""
    rewards = arrays["a"] * arrays["mask"]
    _, returns = rl.gae(rewards, arrays["values"], arrays["mask"], 1.0, 1.0)
    to_go = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * arrays["mask"]
    np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)


def test_policy_loss(arrays):
    logp, old, adv, mask = arrays["a"] * 0.3 - 2, arrays["b"] * 0.3 - 2, arrays["values"], \
        arrays["mask"]
    loss, stats = rl.policy_loss(logp, old, adv, mask, clip=0.2)
    ratio = np.exp(logp - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(loss, per_token[mask > 0].mean(), rtol=1e-5)
    clipped = (-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)
    np.testing.assert_allclose(stats["clip_fraction"], clipped[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["approx_kl"],
                               (0.5 * (logp - old) ** 2)[mask > 0].mean(), rtol=1e-5)
    same, same_stats = rl.policy_loss(old, old, adv, mask)
    np.testing.assert_allclose(same, -adv[mask > 0].mean(), rtol=1e-5)
    assert float(same_stats["clip_fraction"]) == 0 and float(same_stats["approx_kl"]) == 0


def test_value_loss_and_explained_variance(arrays):
    values, old, returns, mask = arrays["a"], arrays["b"], arrays["values"], arrays["mask"]
    loss, stats = rl.value_loss(values, old, returns, mask, clip=0.2)
    clipped_values = old + np.clip(values - old, -0.2, 0.2)
    per_token = 0.5 * np.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    np.testing.assert_allclose(loss, per_token[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        stats["value_clip_fraction"],
        ((clipped_values - returns) ** 2 > (values - returns) ** 2)[mask > 0].mean(), rtol=1e-5)
    ev = 1 - (returns - values)[mask > 0].var() / returns[mask > 0].var()
    np.testing.assert_allclose(rl.explained_variance(values, returns, mask), ev, rtol=1e-4)
    np.testing.assert_allclose(rl.explained_variance(returns, returns, mask), 1.0, rtol=1e-6)


def test_entropy(arrays):
    logits = np.stack([arrays["a"], arrays["b"]], -1)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(rl.entropy_from_logits(logits), -(p * np.log(p)).sum(-1),
                               rtol=1e-5)


def test_adaptive_kl_controller():
    # KL above target: beta grows, by at most 20% x n_steps / horizon.
    assert rl.adaptive_kl_beta(0.1, 12.0, 100, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 0.01))
    assert rl.adaptive_kl_beta(0.1, 6.6, 100, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.1 * 0.01))
    assert rl.adaptive_kl_beta(0.1, 0.0, 100, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 0.01))
    assert rl.adaptive_kl_beta(0.1, 6.0, 100, 6.0, 10000) == pytest.approx(0.1)
