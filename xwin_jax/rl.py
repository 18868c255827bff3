"""The RL math of PPO for language models, as pure functions over [B, T] response arrays.

Every array is laid out per response token: position t of a row is the t-th generated token,
`mask` is 1 on real response tokens (through EOS) and 0 on the padding after them. Statistics
are masked and use the biased variance (REFERENCES.md: what TRL/OpenRLHF do).

    kl = kl_penalty(logp, ref_logp, "k1")
    rewards = token_rewards(score, kl, mask, beta)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = whiten(advantages, mask)
    loss, stats = policy_loss(logp_new, logp_old, advantages, mask, clip=0.2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xwin_jax.errors import ConfigError


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum over mask == 1; by selection, so an inf or NaN on padding cannot leak in."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean over mask == 1 (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Biased variance over mask == 1."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (the mean kept with shift_mean=False); masked-out
    entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from samples of the policy:
    k1 = log p - log p_ref (unbiased, can be negative), k2 = (log p - log p_ref)^2 / 2,
    k3 = (r - 1) - log r with r = p_ref / p (unbiased and >= 0)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ConfigError(f"kl estimator {estimator!r}: choose 'k1', 'k2' or 'k3'")


def last_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last mask-1 position (0 for an empty row)."""
    positions = jnp.arange(mask.shape[-1])
    return jnp.maximum(jnp.max(jnp.where(mask > 0, positions, -1), axis=-1), 0)


def token_rewards(score: jax.Array, kl: jax.Array, mask: jax.Array, beta) -> jax.Array:
    """-beta * KL at every response token, plus the sequence score [B] at the last one."""
    rewards = jnp.where(mask > 0, -beta * kl, 0.0)
    at_last = jax.nn.one_hot(last_index(mask), mask.shape[-1], dtype=rewards.dtype)
    return rewards + score[:, None] * at_last * (jnp.sum(mask, axis=-1, keepdims=True) > 0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V), 0 on padding.
    """
    mask = mask.astype(rewards.dtype)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values * next_mask - values) * mask

    def backward(next_advantage, inputs):
        delta, following = inputs
        advantage = delta + gamma * lam * following * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(rewards[:, 0]),
                                 (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float = 0.2) -> tuple[jax.Array, dict]:
    """The clipped surrogate, max(-A r, -A clip(r, 1-eps, 1+eps)) averaged over response
    tokens, with the clip fraction and approx-KL (mean of (log r)^2 / 2)."""
    # Zeroed on padding before exp: an untrained pad log-prob must not overflow (or give a NaN
    # gradient through the masked-out branch).
    log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
             "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
             "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float = 0.2) -> tuple[jax.Array, dict]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped = V_old + clip(V - V_old, +-eps),
    averaged over response tokens; with the fraction of tokens where the clipped term won."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32),
                                                     mask)}


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over response tokens."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask),
                                                                  1e-8)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of each position's softmax distribution, [..., V] → [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def adaptive_kl_beta(beta, kl, n_steps: int, target: float, horizon: float):
    """Ziegler et al.'s controller: error = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + error * n_steps / horizon). Traceable (beta and kl may be arrays)."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)
