"""PPO for a chat policy against a reward model (the RL step of Xwin-LM V0.2).

One iteration = rollout → scoring → advantages → K epochs x minibatches of clipped updates:

  rollout   sample a response per prompt (sampling.generate, at `temperature`)
  scoring   policy log-probs (logits / temperature, the distribution sampled from), reference
            log-probs, values, and the reward model's score at the last real token,
            normalised by rewards.RewardScorer (the RM's reward_stats.json) inside the same
            jitted pass; responses that never emit EOS get `missing_eos_score`
  advantage per-token reward -beta * KL(k1) plus the score at the last response token;
            GAE(gamma, lam); advantages whitened over the batch
  update    policy and value are separate parameter trees, each updated by the shared
            train step (step.make_train_step) with its own optimizer (state.OptimizerConfig);
            the reference and reward models are frozen and carry no optimizer state

Four models share one mesh. beta is fixed or follows the adaptive controller (Ziegler et al.).
The job runs through the stage runner (stage.run_stage: a finished run with the same settings
is skipped, an unfinished one resumes, one with other settings is refused), and its
iterations run in the shared train loop, so checkpoints, SIGTERM, resume and metrics behave
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
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, SCORE, check_context, open_checkpoint
from xwin_jax.partitioning import Partitioner
from xwin_jax.rewards import RewardScorer, RewardStats, open_reward
from xwin_jax.train import rollout
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import NonFiniteError, non_finite_problem, train_loop
from xwin_jax.train.sharded import ShardedTraining, Start, frozen_params
from xwin_jax.train.stage import export, run_stage
from xwin_jax.train.state import OptimizerConfig
from xwin_jax.train.step import LossOutput, make_train_step

VALUE_EXPORT_DIR = "final_value"
Optimizer = tuple[optax.GradientTransformation, optax.Schedule]  # OptimizerConfig.build's


@flax.struct.dataclass
class PPOState:
    policy: train_state.TrainState
    value: train_state.TrainState
    kl_beta: jax.Array  # the current KL coefficient (adaptive or fixed)
    iteration: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The PPO settings (REFERENCES.md: gamma 1, lambda 0.95, clip 0.2, value clip 0.2, value
    coefficient 0.1, adaptive KL target 6 over horizon 10000; log-probs at the sampling
    temperature, 0.7 as in Xwin's inference)."""
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
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


def values_fn(value_cfg: LlamaConfig, prompt_len: int, stats: RewardStats | None = None
              ) -> Callable:
    """(params, tokens, mask) → values [B, T] in normalised-reward units. A value model that
    starts as a reward model gives raw scores that `stats` (its RewardStats) maps to the
    normalised rewards it must predict; the same affine map is applied in scoring and in the
    update, so it is simply part of the value head (identity by default)."""
    stats = stats or RewardStats()

    def values(params, tokens, mask):
        return stats.normalise(rollout.response_values(value_cfg, params, tokens, mask,
                                                       prompt_len))
    return values


def make_score_fn(policy_cfg: LlamaConfig, prompt_len: int, temperature: float,
                  values_of: Callable, scores_of: Callable) -> Callable:
    """The scoring pass of an iteration: (policy, reference, value, RM params, rollout rows
    {tokens, mask}) → ((policy log-probs, entropy), reference log-probs, values, RM scores).
    `values_of` is values_fn(...); `scores_of(params, tokens, mask)` gives the normalised
    reward [B] (RewardScorer.apply), so normalisation happens inside this one program."""
    def score(policy, reference, value, reward, rows):
        tokens, mask = rows["tokens"], rows["mask"]
        return (rollout.response_logprobs(policy_cfg, policy, tokens, mask, prompt_len,
                                          temperature),
                rollout.response_logprobs(policy_cfg, reference, tokens, mask, prompt_len,
                                          temperature)[0],
                values_of(value, tokens, mask),
                scores_of(reward, tokens, mask))
    return score


def _token_means(means: jax.Array | float, stats: dict, mask: jax.Array,
                 objective_scale: float = 1.0) -> LossOutput:
    """A LossOutput from per-token means over the minibatch's response tokens (rl.py's
    losses): each mean times the token count is its sum, so the train step's division by the
    count gives the means back, and its gradient is that of the mean loss."""
    count = jnp.sum(mask.astype(jnp.float32))
    return LossOutput(objective_scale * means * count, count,
                      {k: v * count for k, v in stats.items()}, "num_response_tokens")


def policy_loss_fn(policy_cfg: LlamaConfig, cfg: PPOConfig, prompt_len: int) -> Callable:
    """(params, minibatch) → LossOutput: the clipped surrogate per response token (reported:
    loss, clip_fraction, approx_kl, ratio_mean, entropy)."""
    def loss_fn(params, mb):
        logp, entropy = rollout.response_logprobs(policy_cfg, params, mb["tokens"], mb["mask"],
                                                  prompt_len, cfg.temperature)
        loss, stats = rl.policy_loss(logp, mb["old_logp"], mb["advantages"],
                                     mb["response_mask"], cfg.clip)
        stats["entropy"] = rl.masked_mean(entropy, mb["response_mask"])
        return _token_means(loss, stats, mb["response_mask"])
    return loss_fn


def value_loss_fn(value_cfg: LlamaConfig, cfg: PPOConfig, prompt_len: int,
                  stats: RewardStats | None = None) -> Callable:
    """(params, minibatch) → LossOutput: value_coef x the clipped value loss per response token
    (reported: loss, clip_fraction)."""
    values_of = values_fn(value_cfg, prompt_len, stats)

    def loss_fn(params, mb):
        values = values_of(params, mb["tokens"], mb["mask"])
        loss, clip_stats = rl.value_loss(values, mb["old_values"], mb["returns"],
                                         mb["response_mask"], cfg.value_clip)
        return _token_means(loss, {"clip_fraction": clip_stats["value_clip_fraction"]},
                            mb["response_mask"], objective_scale=cfg.value_coef)
    return loss_fn


def make_update_step(policy_cfg: LlamaConfig, value_cfg: LlamaConfig, cfg: PPOConfig,
                     prompt_len: int, policy_optimizer: Optimizer, value_optimizer: Optimizer,
                     value_stats: RewardStats | None = None) -> Callable:
    """(policy state, value state, minibatch) → (states, metrics): one clipped policy update
    and one clipped value update, each the shared train step with its (optimizer, schedule)
    (OptimizerConfig.build). Metrics: the policy's loss, grad_norm, learning_rate, ...; the
    value model's as value_loss, value_grad_norm, value_learning_rate, value_clip_fraction;
    update_finite covers both. `value_stats` puts the value head in the units of the
    normalised rewards (see values_fn)."""
    tokens = lambda mb: mb["tokens"].size  # noqa: E731
    policy_step = make_train_step(policy_loss_fn(policy_cfg, cfg, prompt_len),
                                  *policy_optimizer, input_tokens=tokens)
    value_step = make_train_step(value_loss_fn(value_cfg, cfg, prompt_len, value_stats),
                                 *value_optimizer, input_tokens=tokens)

    def step(policy, value, mb):
        policy, metrics = policy_step(policy, mb)
        value, value_metrics = value_step(value, mb)
        for name in ("loss", "grad_norm", "learning_rate", "clip_fraction"):
            metrics[f"value_{name}"] = value_metrics[name]
        metrics["update_finite"] = jnp.minimum(metrics["update_finite"],
                                               value_metrics["update_finite"])
        return policy, value, metrics

    return step


def rollout_rows(params: Any, cfg: LlamaConfig, ppo: PPOConfig, prompt_tokens: np.ndarray,
                 prompt_mask: np.ndarray, key: jax.Array, vocab,
                 partitioner: Partitioner | None = None) -> dict[str, np.ndarray]:
    """One response per prompt row sampled from the policy (row r with split(key, B)[r]),
    assembled into rollout rows (rollout.assemble)."""
    generation = sampling.generate(
        params, cfg, prompt_tokens, prompt_mask, key, max_new_tokens=ppo.max_new_tokens,
        temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
        stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id, partitioner=partitioner)
    return rollout.assemble(prompt_tokens, prompt_mask, generation)


def _check_minibatches(ppo: PPOConfig, batch_size: int, partitioner: Partitioner) -> int:
    minibatch = batch_size // ppo.num_minibatches
    if batch_size % ppo.num_minibatches or minibatch % partitioner.batch_divisor:
        multiple = ppo.num_minibatches * partitioner.batch_divisor
        raise ConfigError(
            f"BATCH_SIZE={batch_size} does not split into num_minibatches="
            f"{ppo.num_minibatches} minibatches that each divide over the "
            f"{partitioner.batch_divisor} data shards (data x fsdp) of the mesh",
            hint=f"use a BATCH_SIZE that is a multiple of {multiple} (num_minibatches x data "
                 f"shards), or set --gin.ppo.PPOConfig.num_minibatches to a divisor of "
                 f"{batch_size} whose minibatches divide over "
                 f"{partitioner.batch_divisor} shards")
    return minibatch


def train_ppo(workdir: str, model: LlamaConfig, train_steps: int, prompts: Any, *,
              policy_dir: str, reward_dir: str, value_dir: str | None = None,
              reference_dir: str | None = None, partitioner: Partitioner | None = None,
              stage: str = "ppo", ppo: PPOConfig = PPOConfig(),
              policy_optimizer: OptimizerConfig = OptimizerConfig(
                  learning_rate=1e-6, decay="constant", eps=1e-5),
              value_optimizer: OptimizerConfig = OptimizerConfig(
                  learning_rate=1e-5, decay="constant", eps=1e-5),
              checkpoint_every: int = 10, keep_checkpoints: int = 3,
              async_checkpoints: bool = True, vocabulary: Any = None, seed: int = 0) -> dict:
    """Runs `train_steps` PPO iterations over batches of `prompts` (data.prompts_data.
    PromptsData, bound to the policy's vocabulary) into WORKDIR/<stage>/; exports the policy to
    final/ and the value model to final_value/ (each with the tokenizer). The policy and the
    reference start from policy_dir (reference_dir to differ), the value model from value_dir
    (an RM, or an LM trunk with a fresh head; default: the reward model). `vocabulary`
    overrides the one policy_dir records; the reward and value models must read the same."""
    partitioner = partitioner or Partitioner()
    start = Start.policy(model, policy_dir, vocabulary or getattr(prompts, "vocabulary", None))
    vocab, policy_cfg = start.vocabulary, start.config
    reference = open_checkpoint(reference_dir or policy_dir, model, what="REFERENCE_DIR")
    if reference.kind != LM or reference.config != policy_cfg:
        raise ConfigError(f"REFERENCE_DIR={reference.path}: not a language model of the "
                          f"policy's architecture (POLICY_DIR={start.checkpoint.path})",
                          hint="the reference is a frozen copy of the starting policy; "
                               "leave reference_dir unset to use POLICY_DIR")
    reference.check_vocabulary(vocab, "REFERENCE_DIR")
    reward = open_reward(reward_dir, model, vocab)
    value = open_checkpoint(value_dir or reward_dir, model, what="VALUE_DIR")
    value.check_vocabulary(vocab, "VALUE_DIR")
    # A value model that starts as a reward model keeps that RM's affine map; an LM trunk's
    # head is new and needs none.
    value_stats = RewardStats.load(value.path) if value.kind == SCORE else RewardStats()
    minibatch = _check_minibatches(ppo, prompts.batch_size, partitioner)
    prompts = prompts.with_vocabulary(vocab)
    check_context(policy_cfg, prompts.max_prompt_len + ppo.max_new_tokens,
                  "MAX_PROMPT_LEN + max_new_tokens")
    settings = {"policy": start, "reference": reference, "reward": reward, "value": value,
                "value_stats": value_stats, "train_steps": train_steps, "prompts": prompts,
                "ppo": ppo, "policy_optimizer": policy_optimizer,
                "value_optimizer": value_optimizer, "seed": seed}

    def body(stage_dir: str) -> dict:
        if jax.process_count() > 1:
            raise ConfigError("PPO runs on one host for now (rollouts gather the prompt batch "
                              "on the host)", hint="run one process and shard over its local "
                                                   "devices")
        updates = train_steps * ppo.epochs * ppo.num_minibatches
        policy_tx, value_tx = policy_optimizer.build(updates), value_optimizer.build(updates)
        policy_setup = ShardedTraining.create(LM, policy_cfg, partitioner, policy_tx[0], seed)
        value_setup = ShardedTraining.create(SCORE, value.config, partitioner, value_tx[0],
                                             seed)
        reference_params = frozen_params(reference, LM, partitioner, seed)[0]
        scorer = RewardScorer.load(reward_dir, model, partitioner)
        scalar = partitioner.replicated
        abstract = PPOState(policy_setup.abstract_state, value_setup.abstract_state,
                            *abstract_like((jax.ShapeDtypeStruct((), jnp.float32),
                                            jax.ShapeDtypeStruct((), jnp.int32)),
                                           (scalar, scalar)))

        def init_state():
            return PPOState(
                policy_setup.init_state(policy_setup.initial_params(start.checkpoint)),
                value_setup.init_state(value_setup.initial_params(value)),
                jax.device_put(jnp.float32(ppo.kl_coef), scalar),
                jax.device_put(jnp.int32(0), scalar))

        batch = partitioner.batch_sharding
        prompt_len = prompts.max_prompt_len
        score_fn = partitioner.partition(
            make_score_fn(policy_cfg, prompt_len, ppo.temperature,
                          values_fn(value.config, prompt_len, value_stats), scorer.apply),
            in_shardings=(policy_setup.param_shardings, policy_setup.param_shardings,
                          value_setup.param_shardings, scorer.shardings, batch),
            out_shardings=batch)
        advantages_fn = jax.jit(lambda *args: advantages(ppo, *args))
        update = partitioner.partition(
            make_update_step(policy_cfg, value.config, ppo, prompt_len, policy_tx, value_tx,
                             value_stats),
            in_shardings=(policy_setup.shardings, value_setup.shardings, batch),
            out_shardings=(policy_setup.shardings, value_setup.shardings, scalar),
            donate_argnums=(0, 1))

        def iteration(state: PPOState, prompt_batch) -> tuple[PPOState, dict]:
            times = {}
            began = time.perf_counter()
            prompt_tokens = np.asarray(prompt_batch["tokens"])
            prompt_mask = np.asarray(prompt_batch["mask"])
            key = jax.random.fold_in(jax.random.key(seed), int(state.iteration))
            rows = rollout_rows(state.policy.params, policy_cfg, ppo, prompt_tokens,
                                prompt_mask, key, vocab, partitioner)
            times["time_rollout_s"] = time.perf_counter() - began

            began = time.perf_counter()
            sharded = partitioner.shard_batch({k: rows[k] for k in ("tokens", "mask")})
            (logp, entropy), ref_logp, values, scores = score_fn(
                state.policy.params, reference_params, state.value.params, scorer.params,
                sharded)
            computed = advantages_fn(scores, rows["finished"], logp, ref_logp, values,
                                     rows["response_mask"], state.kl_beta)
            computed = jax.block_until_ready(computed)
            times["time_scoring_s"] = time.perf_counter() - began

            began = time.perf_counter()
            rows.update(old_logp=logp, old_values=values, advantages=computed["advantages"],
                        returns=computed["returns"])
            host = {k: np.asarray(v) for k, v in rows.items()
                    if k in ("tokens", "mask", "response_mask", "old_logp",
                             "old_values", "advantages", "returns")}
            policy, value_state = state.policy, state.value
            update_metrics = []
            order_key = np.random.default_rng([seed, int(state.iteration)])
            for _ in range(ppo.epochs):
                order = order_key.permutation(prompts.batch_size)
                for m in range(ppo.num_minibatches):
                    picked = order[m * minibatch:(m + 1) * minibatch]
                    policy, value_state, metrics = update(
                        policy, value_state,
                        partitioner.shard_batch({k: v[picked] for k, v in host.items()}))
                    update_metrics.append(metrics)
            update_metrics = jax.device_get(update_metrics)
            times["time_update_s"] = time.perf_counter() - began
            for number, m in enumerate(update_metrics, start=1):
                problem = non_finite_problem(m, ("loss", "grad_norm", "value_loss",
                                                 "value_grad_norm"))
                if problem:
                    raise NonFiniteError(
                        f"iteration {int(state.iteration) + 1}, update {number} of "
                        f"{len(update_metrics)}: {problem}; stopped without saving this state",
                        hint="lower policy_optimizer.learning_rate or value_optimizer."
                             "learning_rate (--gin.LEARNING_RATE / --gin.VALUE_LEARNING_RATE), "
                             "then rerun: training resumes from the last checkpoint")

            response_mask = rows["response_mask"].astype(np.float32)
            kl = float(computed["kl_k1"])
            beta = float(state.kl_beta)
            new_beta = rl.adaptive_kl_beta(beta, kl, prompts.batch_size, ppo.kl_target,
                                           ppo.kl_horizon) if ppo.adaptive_kl else beta
            mean = lambda name: float(np.mean([m[name] for m in update_metrics]))  # noqa: E731
            total = sum(times.values())
            metrics = {
                **{name: mean(name) for name in (
                    "loss", "grad_norm", "learning_rate", "entropy", "clip_fraction",
                    "approx_kl", "value_loss", "value_grad_norm", "value_learning_rate",
                    "value_clip_fraction")},
                "num_input_tokens": float(rows["mask"].sum()),
                "score": float(np.mean(np.asarray(scores))),
                "score_with_eos_penalty": float(np.mean(np.asarray(computed["scores"]))),
                "kl": kl, "kl_k3": float(computed["kl_k3"]), "kl_beta": beta,
                "non_score_reward": float(computed["non_score_reward"]),
                "first_ratio_mean": float(update_metrics[0]["ratio_mean"]),
                "explained_variance": float(rl.explained_variance(
                    np.asarray(values), np.asarray(computed["returns"]), response_mask)),
                "response_length": float(response_mask.sum(axis=1).mean()),
                "no_eos_fraction": float(1.0 - rows["finished"].mean()),
                "sampler_logprob_gap": float(np.abs(
                    (rows["sampler_logprobs"] - np.asarray(logp)) * response_mask).sum()
                    / max(response_mask.sum(), 1.0)),
                **times, "rollout_fraction": times["time_rollout_s"] / total}
            new_state = PPOState(policy, value_state,
                                 jax.device_put(jnp.float32(new_beta), scalar),
                                 jax.device_put(jnp.int32(int(state.iteration) + 1), scalar))
            return new_state, metrics

        state, summary = train_loop(
            stage_dir=stage_dir, num_steps=train_steps, partitioner=partitioner,
            init_state=init_state, abstract_state=abstract, train_step=iteration,
            batches=prompts.batches, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints,
            description=stage)
        export_dir = export(stage_dir, policy_cfg, state.policy.params, vocab)
        value_dir_out = export(stage_dir, value.config, state.value.params, vocab,
                               kind=SCORE, name=VALUE_EXPORT_DIR)
        value_stats.save(value_dir_out)  # the value head's affine map travels with it
        if jax.process_index() == 0:
            print(f"[{stage}] {train_steps} iterations, policy → {export_dir}")
        return dict(summary, export_dir=export_dir, value_export_dir=value_dir_out,
                    final_kl_beta=float(state.kl_beta))

    return run_stage(os.path.join(workdir, stage), stage, settings, body)

