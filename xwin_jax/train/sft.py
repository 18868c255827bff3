"""Supervised fine-tuning: masked next-token cross-entropy, its train/eval steps, and the job.

Batch fields (process-local NumPy, [B, S]): input_tokens, target_tokens, loss_weights
(1 on assistant tokens and their </s>, else 0), and optionally segment_ids and positions for
packed rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama
from xwin_jax.models.spec import LM
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.sharded import ShardedTraining, Start
from xwin_jax.train.stage import export, run_stage
from xwin_jax.train.state import OptimizerConfig
from xwin_jax.train.step import LossOutput, make_eval_step, make_train_step

TOKEN_SUMS = ("nll", "z_loss", "accuracy", "num_tokens")


def _chunk_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float):
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"nll": jnp.sum((log_z - target_logit) * weights),
            "z_loss": jnp.sum(z_loss * jnp.square(log_z) * weights),
            "accuracy": jnp.sum(correct * weights),
            "num_tokens": jnp.sum(weights)}


def token_loss_sums(model: Llama, params: Any, hidden: jax.Array, targets: jax.Array,
                    weights: jax.Array, *, z_loss: float = 0.0,
                    chunk_size: int | None = None) -> dict[str, jax.Array]:
    """Summed cross-entropy (and z-loss, accuracy, token count) of the LM head over hidden
    states. With chunk_size, the head runs over sequence chunks under jax.checkpoint, so the
    fp32 logits of the whole batch never exist at once, in the forward or backward pass."""
    def stats(h, t, w):
        logits = model.apply({"params": params}, h, method=Llama.logits_from_hidden)
        return _chunk_stats(logits, t, w, z_loss)

    seq_len = hidden.shape[1]
    if not chunk_size or chunk_size >= seq_len:
        return stats(hidden, targets, weights)
    if seq_len % chunk_size:
        raise ConfigError(f"logits chunk_size={chunk_size} must divide seq_len={seq_len}")
    n = seq_len // chunk_size

    def to_chunks(x):  # [B, S, ...] → [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], n, chunk_size) + x.shape[2:]), 1, 0)

    def body(totals, chunk):
        chunk_totals = jax.checkpoint(stats)(*chunk)
        return jax.tree.map(jnp.add, totals, chunk_totals), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in TOKEN_SUMS}
    totals, _ = jax.lax.scan(body, zeros, (to_chunks(hidden), to_chunks(targets),
                                           to_chunks(weights)))
    return totals


def sft_loss_fn(model_cfg: LlamaConfig, *, z_loss: float = 0.0,
                chunk_size: int | None = None) -> Callable[[Any, dict], LossOutput]:
    """(params, batch) → LossOutput: the summed cross-entropy plus z-loss over target tokens
    (reported: loss, nll, z_loss, accuracy per token)."""
    model = Llama(model_cfg)

    def loss_fn(params, batch):
        hidden = model.apply({"params": params}, batch["input_tokens"],
                             positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"), return_hidden=True)
        sums = token_loss_sums(model, params, hidden, batch["target_tokens"],
                               batch["loss_weights"].astype(jnp.float32), z_loss=z_loss,
                               chunk_size=chunk_size)
        count = sums.pop("num_tokens")
        return LossOutput(sums["nll"] + sums["z_loss"], count, sums, "num_tokens")

    return loss_fn


def make_eval_fn(eval_step: Callable, partitioner: Partitioner, eval_data: Any,
                 num_batches: int) -> Callable[[Any], dict]:
    """state → the loss output's means over the first num_batches of eval_data."""
    def evaluate(state):
        total = None
        batches = eval_data.batches(0)
        for _ in range(num_batches):
            out = jax.device_get(eval_step(state.params, partitioner.shard_batch(next(batches))))
            total = out if total is None else total + out
        return {k: float(v) for k, v in total.means().items()}
    return evaluate


def fit(stage_dir: str, start: Start, train_steps: int, train_data: Any, *,
        partitioner: Partitioner, optimizer: OptimizerConfig, z_loss: float = 0.0,
        num_micro_batches: int = 1, logits_chunk_size: int | None = None,
        checkpoint_every: int = 100, keep_checkpoints: int = 3, async_checkpoints: bool = True,
        eval_data: Any = None, eval_batches: int = 4, eval_every: int = 0, seed: int = 0,
        peak_tflops: float | None = None, description: str = "sft") -> dict:
    """Trains (or resumes) a language model from `start` into STAGE_DIR and exports it to
    STAGE_DIR/final; the body of the SFT stage and of rejection sampling's fine-tune."""
    model = start.config
    if hasattr(train_data, "report") and jax.process_index() == 0:
        print(f"[{description}] train data: {train_data.report()}")
    tx, schedule = optimizer.build(train_steps)
    setup = ShardedTraining.create(LM, model, partitioner, tx, seed)
    loss_fn = sft_loss_fn(model, z_loss=z_loss, chunk_size=logits_chunk_size)
    step_fn = setup.partition_step(make_train_step(loss_fn, tx, schedule, num_micro_batches,
                                                   compute_params=setup.compute_params))
    eval_fn = None
    if eval_data is not None:
        eval_fn = make_eval_fn(setup.partition_eval(make_eval_step(loss_fn,
                                                                   setup.compute_params)),
                               partitioner, eval_data, eval_batches)
    state, summary = setup.train(
        start, stage_dir, train_steps, step_fn, train_data.batches,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, eval_fn=eval_fn, eval_every=eval_every,
        flops_per_token=model.train_flops_per_token(train_data.seq_len),
        peak_tflops=peak_tflops, description=description)
    export_dir = export(stage_dir, model, state.params, start.vocabulary)
    if jax.process_index() == 0:
        print(f"[{description}] {train_steps} steps, final loss "
              f"{summary['final_train_loss']}, params → {export_dir}")
    return dict(summary, export_dir=export_dir, num_params=model.num_params())


def train_sft(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
              partitioner: Partitioner | None = None, stage: str = "sft",
              optimizer: OptimizerConfig = OptimizerConfig(), z_loss: float = 0.0,
              num_micro_batches: int = 1, logits_chunk_size: int | None = None,
              checkpoint_every: int = 100, keep_checkpoints: int = 3,
              async_checkpoints: bool = True, eval_data: Any = None, eval_batches: int = 4,
              eval_every: int = 0, init_dir: str | None = None, vocabulary: Any = None,
              seed: int = 0, peak_tflops: float | None = None) -> dict:
    """The SFT job: trains (or resumes) into WORKDIR/<stage>/ and exports the final params
    (with the tokenizer) to WORKDIR/<stage>/final. `init_dir`: a params checkpoint or an HF
    directory to start from (None: random init); `vocabulary` overrides the one it records.
    `train_data` and `eval_data` have `.batches(start_step)`, `.seq_len` and
    `.with_vocabulary(v)` (e.g. data.sft_data.SftData)."""
    start = Start.resolve(model, init_dir, vocabulary or getattr(train_data, "vocabulary", None))
    train_data, eval_data = start.bind(train_data, eval_data)
    settings = {"start": start, "train_steps": train_steps, "train_data": train_data,
                "optimizer": optimizer, "z_loss": z_loss, "eval_data": eval_data,
                "eval_batches": eval_batches, "seed": seed}
    return run_stage(os.path.join(workdir, stage), stage, settings, lambda stage_dir: fit(
        stage_dir, start, train_steps, train_data, partitioner=partitioner or Partitioner(),
        optimizer=optimizer, z_loss=z_loss, num_micro_batches=num_micro_batches,
        logits_chunk_size=logits_chunk_size, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints,
        eval_data=eval_data, eval_batches=eval_batches, eval_every=eval_every, seed=seed,
        peak_tflops=peak_tflops, description=stage))
