"""PPO for a chat policy against a reward model (the RL step of Xwin-LM V0.2).

One iteration = rollout → scoring → K epochs x minibatches of clipped updates, three jitted
programs (PPOPhases) on arrays that stay on the devices:

  rollout   the policy resharded into the decode layout (decoding.py: weights split over
            heads / MLP / vocab, no weight gathers per token), a response per prompt sampled
            at the traced `temperature` / top-k / top-p, assembled into rows
  scoring   policy log-probs (logits / temperature, the distribution sampled from), reference
            log-probs, values, and the reward model's score at the last real token,
            normalised by rewards.RewardScorer (the RM's reward_stats.json); responses that
            never emit EOS get `missing_eos_score`; per-token reward -beta * KL(k1) plus the
            score at the last response token, GAE(gamma, lam), whitened advantages, the
            iteration's metrics, the next beta and the minibatch order
  update    policy and value are separate parameter trees, each updated by the shared
            train step (step.make_train_step) with its own optimizer (state.OptimizerConfig)
            on minibatches gathered on the devices; the reference and reward models are
            frozen and carry no optimizer state

The iteration reads its metrics back once, at the end (and checks every update for
non-finite values there). Prompt batches are padded to their length bucket (PromptsData), so
each program is sized by the prompts drawn. Four models share one mesh, on one host or many.
beta is fixed or follows the adaptive controller (Ziegler et al.). The job runs through the
stage runner (stage.run_stage: a finished run with the same settings is skipped, an unfinished
one resumes, one with other settings is refused), and its iterations run in the shared train
loop, so checkpoints, SIGTERM, resume and metrics behave like every other stage; one iteration
is one "step".
"""

from __future__ import annotations

import dataclasses
import functools
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
from xwin_jax.decoding import DecodeLayout, Decoder
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import (LM, SCORE, check_context, compute_weights, open_checkpoint,
                                  put_global)
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


def prompt_width(rows: dict) -> int:
    """P of rollout rows (tokens [B, P + T], response_mask [B, T]): static, from the shapes,
    so one function serves every prompt bucket."""
    return rows["tokens"].shape[1] - rows["response_mask"].shape[1]


def values_fn(value_cfg: LlamaConfig, stats: RewardStats | None = None) -> Callable:
    """(params, tokens, mask, prompt_len) → values [B, T] in normalised-reward units. A value
    model that starts as a reward model gives raw scores that `stats` (its RewardStats) maps
    to the normalised rewards it must predict; the same affine map is applied in scoring and
    in the update, so it is simply part of the value head (identity by default)."""
    stats = stats or RewardStats()

    def values(params, tokens, mask, prompt_len):
        return stats.normalise(rollout.response_values(value_cfg, params, tokens, mask,
                                                       prompt_len))
    return values


def make_score_fn(policy_cfg: LlamaConfig, values_of: Callable, scores_of: Callable
                  ) -> Callable:
    """The model passes of the scoring phase: (policy, reference, value, RM params, rollout
    rows {tokens, mask, response_mask, temperature}) → ((policy log-probs, entropy),
    reference log-probs, values, RM scores), the log-probs at each row's sampling
    temperature. `values_of` is values_fn(...); `scores_of(params, tokens, mask)` gives the
    normalised reward [B] (RewardScorer.apply), so normalisation happens inside this one
    program."""
    def score(policy, reference, value, reward, rows):
        tokens, mask, width = rows["tokens"], rows["mask"], prompt_width(rows)
        temperature = rows["temperature"]
        return (rollout.response_logprobs(policy_cfg, policy, tokens, mask, width,
                                          temperature),
                rollout.response_logprobs(policy_cfg, reference, tokens, mask, width,
                                          temperature)[0],
                values_of(value, tokens, mask, width),
                scores_of(reward, tokens, mask))
    return score


def make_rollout_fn(policy_cfg: LlamaConfig, max_new_tokens: int, *, mode: str,
                    stop_ids: tuple[int, ...], pad_id: int, seed: int) -> Callable:
    """The rollout phase: (decode-layout weights, prompts {tokens, mask} [B, P], iteration,
    sampling.Settings of traced scalars) → rollout rows (rollout.assemble) plus each row's
    `temperature`. Row r of iteration i samples with split(fold_in(key(seed), i), B)[r].
    `mode` (sampling.sampling_mode) is the one static choice. Every input lives on the
    decode layout's mesh (PPOPhases moves the prompts there and the rows back)."""
    def rollout_fn(weights, prompts, iteration, settings):
        tokens, mask = prompts["tokens"], prompts["mask"]
        batch = tokens.shape[0]
        row_keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), iteration), batch)
        rows = sampling.Settings(*(jnp.broadcast_to(x, (batch,)) for x in settings))
        generation = sampling.generate_program(
            weights, tokens, mask, row_keys, rows, cfg=policy_cfg,
            max_new_tokens=max_new_tokens, mode=mode, stop_ids=stop_ids, pad_id=pad_id)
        assembled = rollout.assemble(tokens, mask, sampling.Generation(*generation))
        assembled["temperature"] = rows.temperature
        return assembled
    return rollout_fn


UPDATE_FIELDS = ("tokens", "mask", "response_mask", "temperature", "old_logp", "old_values",
                 "advantages", "returns")


def make_scoring_phase(cfg: PPOConfig, score_fn: Callable, seed: int,
                       compute_params: tuple[Callable, ...] | None = None) -> Callable:
    """The scoring phase: (policy, reference, value, RM params, rollout rows, kl_beta,
    iteration) → (the update batch (UPDATE_FIELDS), the iteration's metrics, the next beta,
    the next iteration, the minibatch order [epochs x B]) — all on the devices.
    `compute_params`: one cast per model (models.spec.compute_weights with its shardings), so
    the four forward passes gather their weights in the compute dtype."""
    def scoring(policy, reference, value, reward, rows, kl_beta, iteration):
        models = (policy, reference, value, reward)
        if compute_params is not None:
            models = tuple(cast(p) for cast, p in zip(compute_params, models))
        (logp, entropy), ref_logp, values, scores = score_fn(*models, rows)
        computed = advantages(cfg, scores, rows["finished"], logp, ref_logp, values,
                              rows["response_mask"], kl_beta)
        response_mask = rows["response_mask"].astype(jnp.float32)
        batch_size = response_mask.shape[0]
        metrics = {
            "num_input_tokens": jnp.sum(rows["mask"]).astype(jnp.float32),
            "score": jnp.mean(scores), "score_with_eos_penalty": jnp.mean(computed["scores"]),
            "kl": computed["kl_k1"], "kl_k3": computed["kl_k3"], "kl_beta": kl_beta,
            "non_score_reward": computed["non_score_reward"],
            "explained_variance": rl.explained_variance(values, computed["returns"],
                                                        response_mask),
            "response_length": jnp.mean(jnp.sum(response_mask, axis=1)),
            "no_eos_fraction": 1.0 - jnp.mean(rows["finished"].astype(jnp.float32)),
            "sampler_logprob_gap": jnp.sum(jnp.abs(rows["sampler_logprobs"] - logp)
                                           * response_mask)
            / jnp.maximum(jnp.sum(response_mask), 1.0)}
        new_beta = rl.adaptive_kl_beta(kl_beta, computed["kl_k1"], batch_size, cfg.kl_target,
                                       cfg.kl_horizon) if cfg.adaptive_kl else kl_beta
        update_batch = {"old_logp": logp, "old_values": values,
                        "advantages": computed["advantages"], "returns": computed["returns"],
                        **{k: rows[k] for k in ("tokens", "mask", "response_mask",
                                                "temperature")}}
        order_keys = jax.random.split(jax.random.fold_in(
            jax.random.fold_in(jax.random.key(seed), iteration), 1), cfg.epochs)
        order = jnp.concatenate([jax.random.permutation(k, batch_size) for k in order_keys])
        return (update_batch, metrics, new_beta.astype(jnp.float32),
                (iteration + 1).astype(jnp.int32), order.astype(jnp.int32))
    return scoring


def make_minibatch_update(update_step: Callable, minibatch: int, partitioner: Partitioner
                          ) -> Callable:
    """The update phase's step: (policy state, value state, update batch, order, k) → the
    states after minibatch k (rows order[k*minibatch : (k+1)*minibatch], gathered on the
    devices and split over the data shards again) and its metrics."""
    def update(policy, value, batch, order, k):
        picked = jax.lax.dynamic_slice_in_dim(order, k * minibatch, minibatch)
        mb = {name: jax.lax.with_sharding_constraint(jnp.take(x, picked, axis=0),
                                                     partitioner.data_sharding(x.ndim))
              for name, x in batch.items()}
        return update_step(policy, value, mb)
    return update


def _token_means(means: jax.Array | float, stats: dict, mask: jax.Array,
                 objective_scale: float = 1.0) -> LossOutput:
    """A LossOutput from per-token means over the minibatch's response tokens (rl.py's
    losses): each mean times the token count is its sum, so the train step's division by the
    count gives the means back, and its gradient is that of the mean loss."""
    count = jnp.sum(mask.astype(jnp.float32))
    return LossOutput(objective_scale * means * count, count,
                      {k: v * count for k, v in stats.items()}, "num_response_tokens")


def policy_loss_fn(policy_cfg: LlamaConfig, cfg: PPOConfig) -> Callable:
    """(params, minibatch) → LossOutput: the clipped surrogate per response token (reported:
    loss, clip_fraction, approx_kl, ratio_mean, entropy), at each row's temperature."""
    def loss_fn(params, mb):
        logp, entropy = rollout.response_logprobs(policy_cfg, params, mb["tokens"], mb["mask"],
                                                  prompt_width(mb), mb["temperature"])
        loss, stats = rl.policy_loss(logp, mb["old_logp"], mb["advantages"],
                                     mb["response_mask"], cfg.clip)
        stats["entropy"] = rl.masked_mean(entropy, mb["response_mask"])
        return _token_means(loss, stats, mb["response_mask"])
    return loss_fn


def value_loss_fn(value_cfg: LlamaConfig, cfg: PPOConfig, stats: RewardStats | None = None
                  ) -> Callable:
    """(params, minibatch) → LossOutput: value_coef x the clipped value loss per response token
    (reported: loss, clip_fraction)."""
    values_of = values_fn(value_cfg, stats)

    def loss_fn(params, mb):
        values = values_of(params, mb["tokens"], mb["mask"], prompt_width(mb))
        loss, clip_stats = rl.value_loss(values, mb["old_values"], mb["returns"],
                                         mb["response_mask"], cfg.value_clip)
        return _token_means(loss, {"clip_fraction": clip_stats["value_clip_fraction"]},
                            mb["response_mask"], objective_scale=cfg.value_coef)
    return loss_fn


def make_update_step(policy_cfg: LlamaConfig, value_cfg: LlamaConfig, cfg: PPOConfig,
                     policy_optimizer: Optimizer, value_optimizer: Optimizer,
                     value_stats: RewardStats | None = None,
                     policy_compute: Callable | None = None,
                     value_compute: Callable | None = None) -> Callable:
    """(policy state, value state, minibatch) → (states, metrics): one clipped policy update
    and one clipped value update, each the shared train step with its (optimizer, schedule)
    (OptimizerConfig.build). Metrics: the policy's loss, grad_norm, learning_rate, ...; the
    value model's as value_loss, value_grad_norm, value_learning_rate, value_clip_fraction;
    update_finite covers both. `value_stats` puts the value head in the units of the
    normalised rewards (see values_fn); `policy_compute` / `value_compute` are the setups'
    compute_params (FSDP gathers in the compute dtype)."""
    tokens = lambda mb: mb["tokens"].size  # noqa: E731
    policy_step = make_train_step(policy_loss_fn(policy_cfg, cfg),
                                  *policy_optimizer, input_tokens=tokens,
                                  compute_params=policy_compute)
    value_step = make_train_step(value_loss_fn(value_cfg, cfg, value_stats),
                                 *value_optimizer, input_tokens=tokens,
                                 compute_params=value_compute)

    def step(policy, value, mb):
        policy, metrics = policy_step(policy, mb)
        value, value_metrics = value_step(value, mb)
        for name in ("loss", "grad_norm", "learning_rate", "clip_fraction"):
            metrics[f"value_{name}"] = value_metrics[name]
        metrics["update_finite"] = jnp.minimum(metrics["update_finite"],
                                               value_metrics["update_finite"])
        return policy, value, metrics

    return step


@dataclasses.dataclass
class PPOPhases:
    """An iteration's three jitted programs — rollout (decode layout), scoring, update — and
    the one that moves the policy into the decode layout. The batch stays on the devices from
    the rollout to the last update; the iteration reads back its metrics once, at the end.
    aot.plan_ppo compiles these same programs."""
    cfg: PPOConfig
    decoder: Decoder
    rollout: Callable  # (decode weights, prompts, iteration, settings) → rollout rows
    scoring: Callable  # (policy, reference, value, reward, rows, beta, iteration) → ...
    update: Callable  # (policy state, value state, batch, order, k) → (states, metrics)
    settings: sampling.Settings  # traced scalars on the devices
    batch_sharding: Any  # the training layout's, where scoring and update read the rows

    @classmethod
    def create(cls, policy_cfg: LlamaConfig, value_cfg: LlamaConfig, ppo: PPOConfig,
               partitioner: Partitioner, policy_setup: ShardedTraining,
               value_setup: ShardedTraining, reward_shardings: Any, *,
               policy_optimizer: Optimizer, value_optimizer: Optimizer,
               scores_of: Callable, minibatch: int, stop_ids: tuple[int, ...] | None = None,
               pad_id: int | None = None, vocab: Any = None,
               value_stats: RewardStats | None = None, seed: int = 0,
               decode_layout: DecodeLayout | None = None) -> "PPOPhases":
        decoder = Decoder.create(policy_cfg, partitioner, decode_layout)
        batch_size, divisor = minibatch * ppo.num_minibatches, decoder.partitioner.batch_divisor
        if batch_size % divisor:
            raise ConfigError(f"BATCH_SIZE={batch_size} does not divide over the {divisor} "
                              f"copies of the decode layout {decoder.partitioner.sizes}",
                              hint=f"use a multiple of {divisor}, or set "
                                   f"--gin.decoding.DecodeLayout.tensor")
        host_settings = sampling.row_settings(1, ppo.temperature, ppo.top_k, ppo.top_p)
        batch, scalar = partitioner.batch_sharding, partitioner.replicated
        rollout_fn = decoder.partitioner.partition(
            make_rollout_fn(policy_cfg, ppo.max_new_tokens,
                            mode=sampling.sampling_mode(host_settings, policy_cfg.vocab_size),
                            stop_ids=stop_ids or (vocab.eos_id,),
                            pad_id=vocab.pad_id if pad_id is None else pad_id, seed=seed),
            out_shardings=decoder.partitioner.batch_sharding)
        score_fn = make_score_fn(policy_cfg, values_fn(value_cfg, value_stats), scores_of)
        casts = (policy_setup.compute_params, policy_setup.compute_params,
                 value_setup.compute_params,
                 functools.partial(compute_weights, dtype=value_cfg.dtype,
                                   shardings=reward_shardings))
        scoring = partitioner.partition(
            make_scoring_phase(ppo, score_fn, seed, casts),
            in_shardings=(policy_setup.param_shardings, policy_setup.param_shardings,
                          value_setup.param_shardings, reward_shardings, batch, scalar,
                          scalar),
            out_shardings=(batch, scalar, scalar, scalar, scalar))
        update = partitioner.partition(
            make_minibatch_update(make_update_step(
                policy_cfg, value_cfg, ppo, policy_optimizer, value_optimizer, value_stats,
                policy_compute=policy_setup.compute_params,
                value_compute=value_setup.compute_params), minibatch, partitioner),
            in_shardings=(policy_setup.shardings, value_setup.shardings, batch, scalar,
                          scalar),
            out_shardings=(policy_setup.shardings, value_setup.shardings, scalar),
            donate_argnums=(0, 1))
        settings = sampling.Settings(*(put_global(np.asarray(x[0]),
                                                  decoder.partitioner.replicated)
                                       for x in host_settings))
        return cls(ppo, decoder, rollout_fn, scoring, update, settings, batch)

    def iteration(self, state: PPOState, prompts: dict, reference: Any, reward: Any, *,
                  time_phases: bool = False) -> tuple[PPOState, dict]:
        """rollout → scoring → epochs x minibatches updates, dispatched without waiting;
        then one read of every metric (and the non-finite check on each update)."""
        times, began = {}, time.perf_counter()

        def phase_done(name, *outputs):
            nonlocal began
            if time_phases:
                jax.block_until_ready(outputs)
                times[f"time_{name}_s"] = time.perf_counter() - began
                began = time.perf_counter()

        weights = self.decoder.weights(state.policy.params)
        decode = self.decoder.partitioner
        # Device to device: the prompts (and the counter) onto the decode layout's mesh, the
        # rows back onto the training layout's.
        inputs = jax.device_put(({k: prompts[k] for k in ("tokens", "mask")}, state.iteration),
                                (decode.batch_sharding, decode.replicated))
        rows = jax.device_put(self.rollout(weights, *inputs, self.settings),
                              self.batch_sharding)
        del weights  # the decode copy is not needed by scoring and update
        phase_done("rollout", rows)
        batch, metrics, beta, next_iteration, order = self.scoring(
            state.policy.params, reference, state.value.params, reward, rows, state.kl_beta,
            state.iteration)
        phase_done("scoring", batch)
        policy, value = state.policy, state.value
        updates = []
        for k in range(self.cfg.epochs * self.cfg.num_minibatches):
            policy, value, update_metrics = self.update(policy, value, batch, order, k)
            updates.append(update_metrics)
        phase_done("update", policy, value)
        host = jax.device_get({"iteration": metrics, "updates": updates,
                               "index": state.iteration})  # the one host sync
        for number, m in enumerate(host["updates"], start=1):
            problem = non_finite_problem(m, ("loss", "grad_norm", "value_loss",
                                             "value_grad_norm"))
            if problem:
                raise NonFiniteError(
                    f"iteration {int(host['index']) + 1}, update {number} of "
                    f"{len(updates)}: {problem}; stopped without saving this state",
                    hint="lower policy_optimizer.learning_rate or value_optimizer."
                         "learning_rate (--gin.LEARNING_RATE / --gin.VALUE_LEARNING_RATE), "
                         "then rerun: training resumes from the last checkpoint")
        mean = lambda name: float(np.mean([m[name] for m in host["updates"]]))  # noqa: E731
        out = {name: mean(name) for name in (
            "loss", "grad_norm", "learning_rate", "entropy", "clip_fraction", "approx_kl",
            "value_loss", "value_grad_norm", "value_learning_rate", "value_clip_fraction")}
        out.update({k: float(v) for k, v in host["iteration"].items()})
        out["first_ratio_mean"] = float(host["updates"][0]["ratio_mean"])
        if time_phases:
            out.update(times, rollout_fraction=times["time_rollout_s"] / sum(times.values()))
        return PPOState(policy, value, beta, next_iteration), out


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
              async_checkpoints: bool = True, vocabulary: Any = None, seed: int = 0,
              decode_layout: DecodeLayout | None = None, time_phases: bool = False) -> dict:
    """Runs `train_steps` PPO iterations over batches of `prompts` (data.prompts_data.
    PromptsData, bound to the policy's vocabulary) into WORKDIR/<stage>/; exports the policy to
    final/ and the value model to final_value/ (each with the tokenizer). The policy and the
    reference start from policy_dir (reference_dir to differ), the value model from value_dir
    (an RM, or an LM trunk with a fresh head; default: the reward model). `vocabulary`
    overrides the one policy_dir records; the reward and value models must read the same.
    `decode_layout`: how the policy is split while it samples (decoding.py); `time_phases`
    waits for each phase to report its wall time (time_rollout_s, ...; one host sync per
    phase instead of one per iteration)."""
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

        phases = PPOPhases.create(policy_cfg, value.config, ppo, partitioner,
                                  policy_setup, value_setup, scorer.shardings,
                                  policy_optimizer=policy_tx, value_optimizer=value_tx,
                                  scores_of=scorer.apply, value_stats=value_stats,
                                  minibatch=minibatch, vocab=vocab, seed=seed,
                                  decode_layout=decode_layout)

        def iteration(state: PPOState, prompt_batch) -> tuple[PPOState, dict]:
            return phases.iteration(state, prompt_batch, reference_params, scorer.params,
                                    time_phases=time_phases)

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

