"""PPO for a chat policy against a reward model (the RL step of Xwin-LM V0.2).

One iteration = rollout → scoring → advantages → K epochs x minibatches of clipped updates:

  rollout   sample a response per prompt (sampling.generate, at `temperature`)
  scoring   policy log-probs (logits / temperature, the distribution sampled from), reference
            log-probs, values, reward-model score at the last real token, normalised with the
            RM's reward_stats.json; responses that never emit EOS get `missing_eos_score`
  advantage per-token reward -beta * KL(k1) plus the score at the last response token;
            GAE(gamma, lam); advantages whitened over the batch
  update    policy and value are separate parameter trees with their own optimizers; the
            reference and reward models are frozen and carry no optimizer state

Four models share one mesh. beta is fixed or follows the adaptive controller (Ziegler et al.).
Iterations run in the shared train loop, so checkpoints, SIGTERM, resume and metrics behave
like every other stage; one iteration is one "step".
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xwin_jax import rl, sampling
from xwin_jax.checkpoints.manager import abstract_like
from xwin_jax.checkpoints.params import load_config, load_head, load_params, save_params
from xwin_jax.errors import ConfigError
from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import rollout
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import (NonFiniteError, finished_summary, non_finite_problem,
                                 train_loop, write_summary)
from xwin_jax.train.sharded import ShardedTraining, put_global

EXPORT_DIR = "final"
VALUE_EXPORT_DIR = "final_value"


@flax.struct.dataclass
class PPOState:
    policy: train_state.TrainState
    value: train_state.TrainState
    kl_beta: jax.Array  # the current KL coefficient (adaptive or fixed)
    iteration: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    kl_coef: float = 0.05  # the initial beta
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"  # in the per-token reward; k1 and k3 are both reported
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    epochs: int = 4
    num_minibatches: int = 4
    missing_eos_score: float = -1.0  # the normalised score of a response without EOS
    whiten_advantages: bool = True


def advantages(cfg: PPOConfig, scores: jax.Array, finished: jax.Array, logp: jax.Array,
               ref_logp: jax.Array, values: jax.Array, mask: jax.Array, beta) -> dict:
    """Per-token rewards, advantages and returns for one rollout batch, plus its KL metrics.
    `scores` are already normalised; rows without EOS get cfg.missing_eos_score."""
    mask = mask.astype(jnp.float32)
    # Padding after EOS holds untrained log-probs: zero them so no estimator overflows there.
    logp, ref_logp = (jnp.where(mask > 0, x, 0.0) for x in (logp, ref_logp))
    scores = jnp.where(finished, scores, cfg.missing_eos_score)
    kl = rl.kl_penalty(logp, ref_logp, cfg.kl_estimator)
    rewards = rl.token_rewards(scores, kl, mask, beta)
    adv, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = rl.whiten(adv, mask)
    per_sequence = lambda x: jnp.mean(rl.masked_sum(x, mask, axis=1))  # noqa: E731
    return {"advantages": adv, "returns": returns, "scores": scores,
            "kl_k1": per_sequence(rl.kl_penalty(logp, ref_logp, "k1")),
            "kl_k3": per_sequence(rl.kl_penalty(logp, ref_logp, "k3")),
            "non_score_reward": per_sequence(rewards) - jnp.mean(scores)}


def make_score_fn(policy_cfg: LlamaConfig, reward_cfg: LlamaConfig, prompt_len: int,
                  temperature: float, values_of: Callable):
    """The scoring pass of an iteration: (policy, reference, value, RM params, rollout rows
    {tokens, mask}) → ((policy log-probs, entropy), reference log-probs, values, RM scores)."""
    def score(policy, reference, value, reward, rows):
        tokens, mask = rows["tokens"], rows["mask"]
        return (rollout.response_logprobs(policy_cfg, policy, tokens, mask, prompt_len,
                                          temperature),
                rollout.response_logprobs(policy_cfg, reference, tokens, mask, prompt_len,
                                          temperature)[0],
                values_of(value, tokens, mask),
                rollout.reward_scores(reward_cfg, reward, tokens, mask))
    return score


def make_update_step(policy_cfg: LlamaConfig, value_cfg: LlamaConfig, cfg: PPOConfig,
                     prompt_len: int, policy_optimizer: optax.GradientTransformation,
                     value_optimizer: optax.GradientTransformation,
                     value_stats: dict | None = None):
    """(policy state, value state, minibatch) → (states, metrics): one clipped policy update
    and one clipped value update. `value_stats` (mean, std) puts the value head in the units
    of the normalised rewards (see values_fn)."""
    values_of = values_fn(value_cfg, prompt_len, value_stats)
    def policy_objective(params, mb):
        logp, entropy = rollout.response_logprobs(policy_cfg, params, mb["tokens"], mb["mask"],
                                                  prompt_len, cfg.temperature)
        loss, stats = rl.policy_loss(logp, mb["old_logp"], mb["advantages"],
                                     mb["response_mask"], cfg.clip)
        return loss, dict(stats, entropy=rl.masked_mean(entropy, mb["response_mask"]))

    def value_objective(params, mb):
        values = values_of(params, mb["tokens"], mb["mask"])
        loss, stats = rl.value_loss(values, mb["old_values"], mb["returns"],
                                    mb["response_mask"], cfg.value_clip)
        return cfg.value_coef * loss, dict(stats, value_loss=loss)

    def step(policy, value, mb):
        (policy_loss, policy_stats), policy_grads = jax.value_and_grad(
            policy_objective, has_aux=True)(policy.params, mb)
        (_, value_stats), value_grads = jax.value_and_grad(
            value_objective, has_aux=True)(value.params, mb)
        policy = train_state.apply_gradients(policy, policy_grads, policy_optimizer)
        value = train_state.apply_gradients(value, value_grads, value_optimizer)
        metrics = dict(policy_stats, **value_stats, policy_loss=policy_loss,
                       grad_norm=optax.global_norm(policy_grads),
                       value_grad_norm=optax.global_norm(value_grads),
                       update_finite=train_state.all_finite(
                           policy.params, policy.opt_state, value.params,
                           value.opt_state).astype(jnp.float32))
        return policy, value, metrics

    return step


def values_fn(value_cfg: LlamaConfig, prompt_len: int, stats: dict | None = None):
    """(params, tokens, mask) → values [B, T] in normalised-reward units. The value model
    starts as the reward model, whose raw scores are (r - mean) / std away from the
    normalised rewards it must predict; the same affine map is applied in scoring and in the
    update, so it is simply part of the value head."""
    mean, std = (stats["mean"], stats["std"]) if stats else (0.0, 1.0)

    def values(params, tokens, mask):
        return (rollout.response_values(value_cfg, params, tokens, mask, prompt_len)
                - mean) / std
    return values


def _load_trainable(directory: str, head: str, setup: ShardedTraining, seed: int) -> Any:
    """Params for a trainable tree from a checkpoint: an LM for the policy; for the value
    model an RM (or an LM trunk with a fresh head)."""
    cfg, params = load_params(directory, scan_layers=setup.model.scan_layers, to_host=True)
    if head == "score":
        if load_head(directory) != "score":
            params = heads.reward_params_from_trunk(params, cfg, jax.random.key(seed))
    return params


def _frozen(directory: str, shardings: Any, scan_layers: bool) -> Any:
    """Frozen params (reference / reward) placed straight into the training shardings."""
    params = load_params(directory, scan_layers=scan_layers, to_host=True)[1]
    return jax.tree.map(lambda x, s: put_global(np.asarray(x), s), params, shardings)


def train_ppo(workdir: str, model: LlamaConfig, train_steps: int, prompts: Any, *,
              policy_dir: str, reward_dir: str, value_dir: str | None = None,
              reference_dir: str | None = None, partitioner: Partitioner | None = None,
              stage: str = "ppo", ppo: PPOConfig = PPOConfig(),
              learning_rate: float = 1e-6, value_learning_rate: float = 1e-5,
              warmup_steps: int = 0, decay: str = "constant", adam_eps: float = 1e-5,
              weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
              checkpoint_every: int = 10, keep_checkpoints: int = 3,
              async_checkpoints: bool = True, seed: int = 0) -> dict:
    """Runs `train_steps` PPO iterations over batches of `prompts` (data.prompts_data.
    PromptsData) into WORKDIR/<stage>/; exports the policy to final/ and the value model to
    final_value/. The policy and reference start from policy_dir (reference_dir to differ),
    the value model from value_dir (default: the reward model)."""
    stage_dir = os.path.join(workdir, stage)
    done = finished_summary(stage_dir, stage)
    if done is not None:
        return done
    if jax.process_count() > 1:
        raise ConfigError("PPO runs on one host for now (rollouts gather the prompt batch on "
                          "the host)", hint="run one process and shard over its local devices")
    started = time.perf_counter()
    partitioner = partitioner or Partitioner()
    value_dir = value_dir or reward_dir
    reference_dir = reference_dir or policy_dir
    runtime = model.runtime_fields()
    policy_cfg = load_config(policy_dir).replace(**runtime)
    value_cfg = load_config(value_dir).replace(**runtime)
    reward_cfg = load_config(reward_dir).replace(**runtime)
    minibatch = prompts.batch_size // ppo.num_minibatches
    if prompts.batch_size % ppo.num_minibatches or minibatch % partitioner.batch_divisor:
        multiple = ppo.num_minibatches * partitioner.batch_divisor
        raise ConfigError(
            f"BATCH_SIZE={prompts.batch_size} does not split into num_minibatches="
            f"{ppo.num_minibatches} minibatches that each divide over the "
            f"{partitioner.batch_divisor} data shards (data x fsdp) of the mesh",
            hint=f"use a BATCH_SIZE that is a multiple of {multiple} (num_minibatches x data "
                 f"shards), or set --gin.ppo.PPOConfig.num_minibatches to a divisor of "
                 f"{prompts.batch_size} whose minibatches divide over "
                 f"{partitioner.batch_divisor} shards")
    updates = train_steps * ppo.epochs * ppo.num_minibatches

    def optimizer(lr):
        schedule = train_state.make_schedule(lr, updates, warmup_steps, decay)
        return train_state.make_optimizer(schedule, eps=adam_eps, weight_decay=weight_decay,
                                          max_grad_norm=max_grad_norm)

    policy_opt, value_opt = optimizer(learning_rate), optimizer(value_learning_rate)
    policy_setup = ShardedTraining.create(policy_cfg, partitioner, policy_opt, seed)
    value_setup = ShardedTraining.create(value_cfg, partitioner, value_opt, seed,
                                         init_fn=heads.init_reward_params,
                                         logical_axes_fn=heads.reward_param_logical_axes)
    reward_shardings = partitioner.shardings_for(heads.reward_param_logical_axes(reward_cfg),
                                                 heads.reward_param_shapes(reward_cfg))
    reference = _frozen(reference_dir, policy_setup.param_shardings, policy_cfg.scan_layers)
    reward = _frozen(reward_dir, reward_shardings, reward_cfg.scan_layers)
    stats = rollout.load_reward_stats(reward_dir)
    scalar = partitioner.replicated
    abstract = PPOState(policy_setup.abstract_state, value_setup.abstract_state,
                        *abstract_like((jax.ShapeDtypeStruct((), jnp.float32),
                                        jax.ShapeDtypeStruct((), jnp.int32)), (scalar, scalar)))

    def init_state():
        return PPOState(
            policy_setup.init_state(_load_trainable(policy_dir, "lm", policy_setup, seed)),
            value_setup.init_state(_load_trainable(value_dir, "score", value_setup, seed)),
            jax.device_put(jnp.float32(ppo.kl_coef), scalar),
            jax.device_put(jnp.int32(0), scalar))

    batch = partitioner.batch_sharding
    prompt_len = prompts.max_prompt_len
    score_fn = partitioner.partition(
        make_score_fn(policy_cfg, reward_cfg, prompt_len, ppo.temperature,
                      values_fn(value_cfg, prompt_len, stats)),
        in_shardings=(policy_setup.param_shardings, policy_setup.param_shardings,
                      value_setup.param_shardings, reward_shardings, batch),
        out_shardings=batch)
    advantages_fn = jax.jit(lambda *args: advantages(ppo, *args))
    update = partitioner.partition(
        make_update_step(policy_cfg, value_cfg, ppo, prompt_len, policy_opt, value_opt, stats),
        in_shardings=(policy_setup.shardings, value_setup.shardings, batch),
        out_shardings=(policy_setup.shardings, value_setup.shardings, scalar),
        donate_argnums=(0, 1))
    eos, pad = prompts.vocab.eos_id, prompts.vocab.pad_id

    def iteration(state: PPOState, prompt_batch) -> tuple[PPOState, dict]:
        times = {}
        began = time.perf_counter()
        prompt_tokens = np.asarray(prompt_batch["tokens"])
        prompt_mask = np.asarray(prompt_batch["mask"])
        key = jax.random.fold_in(jax.random.key(seed), int(state.iteration))
        generation = sampling.generate(
            state.policy.params, policy_cfg, prompt_tokens, prompt_mask, key,
            max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k,
            top_p=ppo.top_p, stop_ids=(eos,), pad_id=pad, partitioner=partitioner)
        rows = rollout.assemble(prompt_tokens, prompt_mask, generation)
        times["time_rollout_s"] = time.perf_counter() - began

        began = time.perf_counter()
        sharded = partitioner.shard_batch({k: rows[k] for k in ("tokens", "mask")})
        (logp, entropy), ref_logp, values, raw_scores = score_fn(
            state.policy.params, reference, state.value.params, reward, sharded)
        normalised = (raw_scores - stats["mean"]) / stats["std"]
        computed = advantages_fn(normalised, rows["finished"], logp, ref_logp, values,
                                 rows["response_mask"], state.kl_beta)
        computed = jax.block_until_ready(computed)
        times["time_scoring_s"] = time.perf_counter() - began

        began = time.perf_counter()
        rows.update(old_logp=logp, old_values=values, advantages=computed["advantages"],
                    returns=computed["returns"])
        host = {k: np.asarray(v) for k, v in rows.items()
                if k in ("tokens", "mask", "response_mask", "old_logp",
                         "old_values", "advantages", "returns")}
        policy, value = state.policy, state.value
        update_metrics = []
        order_key = np.random.default_rng([seed, int(state.iteration)])
        for _ in range(ppo.epochs):
            order = order_key.permutation(prompts.batch_size)
            for m in range(ppo.num_minibatches):
                picked = order[m * minibatch:(m + 1) * minibatch]
                policy, value, metrics = update(policy, value, partitioner.shard_batch(
                    {k: v[picked] for k, v in host.items()}))
                update_metrics.append(metrics)
        update_metrics = jax.device_get(update_metrics)
        times["time_update_s"] = time.perf_counter() - began
        for number, m in enumerate(update_metrics, start=1):
            problem = non_finite_problem(m, ("policy_loss", "grad_norm", "value_grad_norm"))
            if problem:
                raise NonFiniteError(
                    f"iteration {int(state.iteration) + 1}, update {number} of "
                    f"{len(update_metrics)}: {problem}; stopped without saving this state",
                    hint="lower learning_rate or value_learning_rate, then rerun: training "
                         "resumes from the last checkpoint")

        response_mask = rows["response_mask"].astype(np.float32)
        kl = float(computed["kl_k1"])
        beta = float(state.kl_beta)
        new_beta = rl.adaptive_kl_beta(beta, kl, prompts.batch_size, ppo.kl_target,
                                       ppo.kl_horizon) if ppo.adaptive_kl else beta
        mean = lambda name: float(np.mean([m[name] for m in update_metrics]))  # noqa: E731
        first = update_metrics[0]
        total = sum(times.values())
        metrics = {
            "loss": mean("policy_loss"), "grad_norm": mean("grad_norm"),
            "num_input_tokens": float(rows["mask"].sum()),
            "score": float(np.mean(np.asarray(raw_scores))),
            "score_normalised": float(np.mean(np.asarray(computed["scores"]))),
            "kl": kl, "kl_k3": float(computed["kl_k3"]), "kl_beta": beta,
            "non_score_reward": float(computed["non_score_reward"]),
            "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"),
            "approx_kl": mean("approx_kl"), "value_loss": mean("value_loss"),
            "value_clip_fraction": mean("value_clip_fraction"),
            "first_ratio_mean": float(first["ratio_mean"]),
            "explained_variance": float(rl.explained_variance(
                np.asarray(values), np.asarray(computed["returns"]), response_mask)),
            "response_length": float(response_mask.sum(axis=1).mean()),
            "no_eos_fraction": float(1.0 - rows["finished"].mean()),
            "sampler_logprob_gap": float(np.abs(
                (rows["sampler_logprobs"] - np.asarray(logp)) * response_mask).sum()
                / max(response_mask.sum(), 1.0)),
            **times, "rollout_fraction": times["time_rollout_s"] / total}
        new_state = PPOState(policy, value, jax.device_put(jnp.float32(new_beta), scalar),
                             jax.device_put(jnp.int32(int(state.iteration) + 1), scalar))
        return new_state, metrics

    state, summary = train_loop(
        stage_dir=stage_dir, num_steps=train_steps, partitioner=partitioner,
        init_state=init_state, abstract_state=abstract, train_step=iteration,
        batches=prompts.batches, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints,
        description=stage)
    export_dir = os.path.join(stage_dir, EXPORT_DIR)
    save_params(export_dir, policy_cfg, state.policy.params)
    save_params(os.path.join(stage_dir, VALUE_EXPORT_DIR), value_cfg, state.value.params,
                head="score")
    summary.update(stage=stage, export_dir=export_dir, final_kl_beta=float(state.kl_beta),
                   wall_time_s=round(time.perf_counter() - started, 2))
    write_summary(stage_dir, summary)
    if jax.process_index() == 0:
        print(f"[{stage}] done: {train_steps} iterations, policy → {export_dir}")
    return summary
