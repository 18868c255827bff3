"""Reward models (Xwin-RM): Bradley-Terry training on preference pairs, evaluation, and the
reward statistics PPO normalises with.

    loss = -log sigmoid(r_chosen - r_rejected - margin) + centering * (r_chosen + r_rejected)^2

with margin = margin_scale x (chosen_rating - rejected_rating) where the judge gave ratings.
The model is a Llama trunk with a scalar head read at the last real token (models/heads.py),
started from an LM checkpoint (SFT's final/ or an HF directory: the trunk, a fresh head), a
reward-model checkpoint (trunk and head), or random. Scoring a trained model's (prompt,
response) texts is rewards.RewardScorer's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax import rewards
from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import SCORE
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.sharded import ShardedTraining, Start
from xwin_jax.train.stage import export, run_stage
from xwin_jax.train.state import OptimizerConfig
from xwin_jax.train.step import LossOutput, make_train_step

GAP_BUCKETS = ((0, 2), (2, 5), (5, 100))  # rating gap (chosen - rejected) ranges for metrics


def pair_input_tokens(batch) -> int:
    """The tokens a pairs batch feeds the model: both sides' rows (reward models, DPO)."""
    return batch["chosen_tokens"].size + batch["rejected_tokens"].size


def pair_rewards(model: heads.RewardModel, params, batch) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) in one forward pass over both sides."""
    width = batch["chosen_tokens"].shape[1]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]])
    mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    scores = model.apply({"params": params}, tokens, mask)
    return tuple(jnp.split(scores, 2))


def reward_loss_fn(cfg: LlamaConfig, margin_scale: float = 0.0, centering: float = 0.0
                   ) -> Callable[[Any, dict], LossOutput]:
    """(params, batch) → LossOutput over pairs: objective = pairwise loss + centering
    (reported per pair: loss, pairwise_loss, centering, margin, accuracy)."""
    model = heads.RewardModel(cfg)

    def loss_fn(params, batch):
        chosen, rejected = pair_rewards(model, params, batch)
        gap = jnp.nan_to_num(batch["chosen_rating"] - batch["rejected_rating"])
        difference = chosen - rejected
        sums = {"pairwise_loss": jnp.sum(-jax.nn.log_sigmoid(difference - margin_scale * gap)),
                "centering": jnp.sum(centering * jnp.square(chosen + rejected)),
                "margin": jnp.sum(difference),
                "accuracy": jnp.sum((difference > 0).astype(jnp.float32))}
        return LossOutput(sums["pairwise_loss"] + sums["centering"],
                          jnp.asarray(chosen.shape[0], jnp.float32), sums, "num_pairs")

    return loss_fn


def evaluate_pairs(score_fn, partitioner: Partitioner, data, num_batches: int) -> dict:
    """Accuracy, mean margin and accuracy by rating gap over the first batches of data."""
    chosen, rejected, gaps = [], [], []
    for step in range(num_batches):
        c, r = jax.device_get(score_fn(partitioner.shard_batch(data.local_batch(step))))
        chosen.append(c), rejected.append(r)
        rows = data.global_batch(step)  # the scores are of the global batch's rows
        gaps.append(rows["chosen_rating"] - rows["rejected_rating"])
    chosen, rejected, gaps = map(np.concatenate, (chosen, rejected, gaps))
    correct = chosen > rejected
    metrics = {"accuracy": float(correct.mean()), "margin": float((chosen - rejected).mean())}
    for low, high in GAP_BUCKETS:
        inside = (gaps > low) & (gaps <= high)
        if inside.any():
            metrics[f"accuracy_gap_{low}_{high}"] = float(correct[inside].mean())
    return metrics


def reward_stats(score_fn, partitioner: Partitioner, data, num_batches: int
                 ) -> rewards.RewardStats:
    """Mean and std of the rewards of both sides of the first batches of data."""
    scores = []
    for step in range(num_batches):
        scores += jax.device_get(score_fn(partitioner.shard_batch(data.local_batch(step))))
    return rewards.RewardStats.of(np.concatenate(scores))


def fit(stage_dir: str, start: Start, train_steps: int, train_data: Any, *,
        partitioner: Partitioner, optimizer: OptimizerConfig, margin_scale: float = 0.0,
        centering: float = 0.0, checkpoint_every: int = 100, keep_checkpoints: int = 3,
        async_checkpoints: bool = True, eval_data: Any = None, eval_every: int = 0,
        eval_batches: int = 8, stats_batches: int = 8, seed: int = 0,
        description: str = "reward") -> dict:
    """Trains (or resumes) a reward model from `start` into STAGE_DIR; exports STAGE_DIR/final
    (kind 'score', with the tokenizer) and its reward_stats.json."""
    cfg = start.config
    tx, schedule = optimizer.build(train_steps)
    setup = ShardedTraining.create(SCORE, cfg, partitioner, tx, seed)
    step = setup.partition_step(make_train_step(reward_loss_fn(cfg, margin_scale, centering),
                                                tx, schedule, input_tokens=pair_input_tokens,
                                                compute_params=setup.compute_params))
    model, weights = heads.RewardModel(cfg), setup.compute_params
    score = setup.partition_eval(lambda params, batch: pair_rewards(model, weights(params),
                                                                    batch))
    eval_fn = None
    if eval_data is not None:
        def eval_fn(state):
            return evaluate_pairs(lambda b: score(state.params, b), partitioner, eval_data,
                                  eval_batches)

    state, summary = setup.train(
        start, stage_dir, train_steps, step, train_data.batches,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, eval_fn=eval_fn, eval_every=eval_every,
        description=description)
    export_dir = export(stage_dir, cfg, state.params, start.vocabulary, kind=SCORE)
    stats = reward_stats(lambda b: score(state.params, b), partitioner,
                         train_data if eval_data is None else eval_data, stats_batches)
    stats.save(export_dir)
    if jax.process_index() == 0:
        print(f"[{description}] eval {summary.get('final_eval')}, reward mean "
              f"{stats.mean:.3f} std {stats.std:.3f} → {export_dir}")
    return dict(summary, export_dir=export_dir, reward_stats=dataclasses.asdict(stats))


def train_reward(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
                 eval_data: Any = None, partitioner: Partitioner | None = None,
                 stage: str = "reward",
                 optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5),
                 margin_scale: float = 0.0, centering: float = 0.0,
                 checkpoint_every: int = 100, keep_checkpoints: int = 3,
                 async_checkpoints: bool = True, eval_every: int = 0, eval_batches: int = 8,
                 stats_batches: int = 8, init_dir: str | None = None, vocabulary: Any = None,
                 seed: int = 0) -> dict:
    """The reward-model job: trains (or resumes) into WORKDIR/<stage>/ and exports
    WORKDIR/<stage>/final (a params checkpoint of kind 'score', with the tokenizer) and
    final/reward_stats.json (mean and std of the rewards on eval_data's pairs, or
    train_data's, for PPO's normalisation). `init_dir`: an LM checkpoint (params or HF: its
    trunk and a fresh head) or a reward-model checkpoint; None: random init. `vocabulary`
    overrides the one the checkpoint records. `train_data` / `eval_data`: PairsData."""
    start = Start.resolve(model, init_dir, vocabulary or getattr(train_data, "vocabulary", None))
    train_data, eval_data = start.bind(train_data, eval_data)
    settings = {"start": start, "train_steps": train_steps, "train_data": train_data,
                "eval_data": eval_data, "optimizer": optimizer, "margin_scale": margin_scale,
                "centering": centering, "eval_batches": eval_batches,
                "stats_batches": stats_batches, "seed": seed}
    return run_stage(os.path.join(workdir, stage), stage, settings, lambda stage_dir: fit(
        stage_dir, start, train_steps, train_data, partitioner=partitioner or Partitioner(),
        optimizer=optimizer, margin_scale=margin_scale, centering=centering,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, eval_data=eval_data, eval_every=eval_every,
        eval_batches=eval_batches, stats_batches=stats_batches, seed=seed,
        description=stage))
