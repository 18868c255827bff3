"""Reward models (Xwin-RM): Bradley-Terry training on preference pairs, evaluation, and the
reward statistics PPO normalises with.

    loss = -log sigmoid(r_chosen - r_rejected - margin) + centering * (r_chosen + r_rejected)^2

with margin = margin_scale x (chosen_rating - rejected_rating) where the judge gave ratings.
The model is a Llama trunk with a scalar head read at the last real token (models/heads.py),
started from an SFT/params checkpoint or an HF directory, or random.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import load_head, load_params, save_params
from xwin_jax.data import converters, formats
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import finished_summary, train_loop, write_summary
from xwin_jax.train.sharded import ShardedTraining, initial_model

EXPORT_DIR = "final"
STATS_FILE = "reward_stats.json"
GAP_BUCKETS = ((0, 2), (2, 5), (5, 100))  # rating gap (chosen - rejected) ranges for metrics


def pair_rewards(model: heads.RewardModel, params, batch) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) in one forward pass over both sides."""
    width = batch["chosen_tokens"].shape[1]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]])
    mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    rewards = model.apply({"params": params}, tokens, mask)
    return jnp.split(rewards, 2)


def reward_loss_fn(cfg: LlamaConfig, margin_scale: float = 0.0, centering: float = 0.0):
    """(params, batch) → (summed objective, sums) for state.make_train_step(count='num_pairs')."""
    model = heads.RewardModel(cfg)

    def loss_fn(params, batch):
        chosen, rejected = pair_rewards(model, params, batch)
        gap = jnp.nan_to_num(batch["chosen_rating"] - batch["rejected_rating"])
        difference = chosen - rejected
        losses = -jax.nn.log_sigmoid(difference - margin_scale * gap)
        center = centering * jnp.square(chosen + rejected)
        sums = {"loss_sum": jnp.sum(losses), "centering_sum": jnp.sum(center),
                "margin_sum": jnp.sum(difference),
                "correct": jnp.sum((difference > 0).astype(jnp.float32)),
                "num_pairs": jnp.asarray(chosen.shape[0], jnp.float32)}
        return sums["loss_sum"] + sums["centering_sum"], sums

    return loss_fn


def evaluate_pairs(score_fn, partitioner: Partitioner, data, num_batches: int) -> dict:
    """Accuracy, mean margin and accuracy by rating gap over the first batches of data."""
    chosen, rejected, gaps = [], [], []
    batches = data.batches(0)
    for _ in range(num_batches):
        batch = next(batches)
        c, r = jax.device_get(score_fn(partitioner.shard_batch(batch)))
        chosen.append(c), rejected.append(r)
        gaps.append(batch["chosen_rating"] - batch["rejected_rating"])
    chosen, rejected, gaps = map(np.concatenate, (chosen, rejected, gaps))
    correct = chosen > rejected
    metrics = {"accuracy": float(correct.mean()), "margin": float((chosen - rejected).mean())}
    for low, high in GAP_BUCKETS:
        inside = (gaps > low) & (gaps <= high)
        if inside.any():
            metrics[f"accuracy_gap_{low}_{high}"] = float(correct[inside].mean())
    return metrics


def score_responses(cfg: LlamaConfig, params: Any, prompts: Sequence[str],
                    responses: Sequence[str], *, vocabulary: str = "bytes", seq_len: int = 1024,
                    batch_size: int = 16, system: str | None = None,
                    stats: dict | None = None) -> np.ndarray:
    """The reward of each (prompt, response) [N], tokenized as in the training pairs (one user
    turn, the response, </s>); normalised with stats' mean and std when given (PPO's units).
    Fixed [batch_size, seq_len] batches, so any N compiles once."""
    vocab = get_vocabulary(vocabulary)
    model = heads.RewardModel(cfg)
    score = jax.jit(lambda p, tokens, mask: model.apply({"params": p}, tokens, mask))
    conversations = [formats.Conversation((formats.Message(formats.USER, p),)) for p in prompts]
    rewards = []
    for start in range(0, len(conversations), batch_size):
        rows = list(range(start, min(start + batch_size, len(conversations))))
        padded = rows + [rows[-1]] * (batch_size - len(rows))
        batch = converters.responses_batch([conversations[i] for i in padded],
                                           [responses[i] for i in padded], vocab, seq_len,
                                           system)
        rewards.append(np.asarray(score(params, batch["tokens"], batch["mask"]))[:len(rows)])
    rewards = np.concatenate(rewards) if rewards else np.zeros((0,), np.float32)
    if stats is not None:
        rewards = (rewards - stats["mean"]) / stats["std"]
    return rewards


def initial_params(cfg: LlamaConfig, init_hf_dir: str | None, init_params_dir: str | None,
                   seed: int) -> Any | None:
    """An SFT/LM checkpoint gives the trunk (fresh head); an RM checkpoint gives both."""
    key = jax.random.key(seed)
    if init_hf_dir:
        return heads.reward_params_from_trunk(hf.load_hf(init_hf_dir, **cfg.runtime_fields())[1],
                                              cfg, key)
    if init_params_dir:
        params = load_params(init_params_dir, scan_layers=cfg.scan_layers, to_host=True)[1]
        if load_head(init_params_dir) == "score":
            return params
        return heads.reward_params_from_trunk(params, cfg, key)
    return None


def train_reward(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
                 eval_data: Any = None, partitioner: Partitioner | None = None,
                 stage: str = "reward", learning_rate: float = 1e-5, warmup_steps: int = 0,
                 decay: str = "cosine", weight_decay: float = 0.0,
                 max_grad_norm: float | None = 1.0, margin_scale: float = 0.0,
                 centering: float = 0.0, checkpoint_every: int = 100, keep_checkpoints: int = 3,
                 async_checkpoints: bool = True, eval_every: int = 0, eval_batches: int = 8,
                 stats_batches: int = 8, init_hf_dir: str | None = None,
                 init_params_dir: str | None = None, seed: int = 0) -> dict:
    """Trains (or resumes) a reward model into WORKDIR/<stage>/; exports WORKDIR/<stage>/final
    (a params checkpoint with head 'score') and final/reward_stats.json (mean and std of the
    rewards on eval_data's responses, or train_data's, for PPO's normalisation)."""
    stage_dir = os.path.join(workdir, stage)
    done = finished_summary(stage_dir, stage)
    if done is not None:
        return done
    started = time.perf_counter()
    partitioner = partitioner or Partitioner()
    cfg = initial_model(model, init_hf_dir, init_params_dir)
    schedule = train_state.make_schedule(learning_rate, train_steps, warmup_steps, decay)
    optimizer = train_state.make_optimizer(schedule, weight_decay=weight_decay,
                                           max_grad_norm=max_grad_norm)
    setup = ShardedTraining.create(cfg, partitioner, optimizer, seed,
                                   init_fn=heads.init_reward_params,
                                   logical_axes_fn=heads.reward_param_logical_axes)
    step = setup.partition_step(train_state.make_train_step(
        reward_loss_fn(cfg, margin_scale, centering), optimizer, schedule, count="num_pairs",
        input_tokens=lambda b: b["chosen_tokens"].size + b["rejected_tokens"].size))
    model_fn = heads.RewardModel(cfg)
    score = partitioner.partition(
        lambda params, batch: pair_rewards(model_fn, params, batch),
        in_shardings=(setup.param_shardings, partitioner.batch_sharding),
        out_shardings=partitioner.replicated)
    eval_fn = None
    if eval_data is not None:
        def eval_fn(state):
            return evaluate_pairs(lambda b: score(state.params, b), partitioner, eval_data,
                                  eval_batches)

    state, summary = train_loop(
        stage_dir=stage_dir, num_steps=train_steps, partitioner=partitioner,
        init_state=lambda: setup.init_state(initial_params(cfg, init_hf_dir, init_params_dir,
                                                           seed)),
        abstract_state=setup.abstract_state, train_step=step, batches=train_data.batches,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, eval_fn=eval_fn, eval_every=eval_every,
        description=stage)
    export_dir = os.path.join(stage_dir, EXPORT_DIR)
    save_params(export_dir, cfg, state.params, head="score")
    reference = eval_data if eval_data is not None else train_data
    rewards = []
    batches = reference.batches(0)
    for _ in range(stats_batches):
        chosen, rejected = jax.device_get(score(state.params, partitioner.shard_batch(
            next(batches))))
        rewards += [chosen, rejected]
    rewards = np.concatenate(rewards)
    stats = {"mean": float(rewards.mean()), "std": float(rewards.std()),
             "count": int(rewards.size)}
    summary.update(stage=stage, export_dir=export_dir, reward_stats=stats,
                   wall_time_s=round(time.perf_counter() - started, 2))
    write_summary(stage_dir, summary)
    if jax.process_index() == 0:
        with open(os.path.join(export_dir, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=2)
        print(f"[{stage}] done: eval {summary.get('final_eval')}, reward mean "
              f"{stats['mean']:.3f} std {stats['std']:.3f} → {export_dir}")
    return summary
