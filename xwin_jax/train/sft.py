"""Supervised fine-tuning: masked next-token cross-entropy, its train/eval steps, and the job.

Batch fields (process-local NumPy, [B, S]): input_tokens, target_tokens, loss_weights
(1 on assistant tokens and their </s>, else 0), and optionally segment_ids and positions for
packed rows.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import load_config, load_params, save_params
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import state as train_state
from xwin_jax.train.state import make_train_step  # noqa: F401  (SFT's step is the generic one)
from xwin_jax.train.loop import finished_summary, train_loop, write_summary
from xwin_jax.train.sharded import ShardedTraining, initial_model

EXPORT_DIR = "final"
METRIC_SUMS = ("loss_sum", "z_loss_sum", "correct", "num_tokens")


def _chunk_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float):
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum((log_z - target_logit) * weights),
            "z_loss_sum": jnp.sum(z_loss * jnp.square(log_z) * weights),
            "correct": jnp.sum(correct * weights),
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

    zeros = {k: jnp.zeros((), jnp.float32) for k in METRIC_SUMS}
    totals, _ = jax.lax.scan(body, zeros, (to_chunks(hidden), to_chunks(targets),
                                           to_chunks(weights)))
    return totals


def sft_loss_fn(model_cfg: LlamaConfig, *, z_loss: float = 0.0,
                chunk_size: int | None = None) -> Callable:
    """(params, batch) → (summed objective, metric sums), the form accumulate_gradients takes."""
    model = Llama(model_cfg)

    def loss_fn(params, batch):
        hidden = model.apply({"params": params}, batch["input_tokens"],
                             positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"), return_hidden=True)
        sums = token_loss_sums(model, params, hidden, batch["target_tokens"],
                               batch["loss_weights"].astype(jnp.float32), z_loss=z_loss,
                               chunk_size=chunk_size)
        return sums["loss_sum"] + sums["z_loss_sum"], sums

    return loss_fn


def make_eval_step(loss_fn: Callable) -> Callable:
    """(params, batch) → metric sums; divide after summing over the eval set."""
    def step(params, batch):
        return loss_fn(params, batch)[1]
    return step


def make_eval_fn(eval_step: Callable, partitioner: Partitioner, eval_data: Any,
                 num_batches: int) -> Callable[[Any], dict]:
    """state → {loss, accuracy} over the first num_batches of eval_data."""
    def evaluate(state):
        totals = None
        batches = eval_data.batches(0)
        for _ in range(num_batches):
            sums = jax.device_get(eval_step(state.params,
                                            partitioner.shard_batch(next(batches))))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        n = max(float(totals["num_tokens"]), 1.0)
        return {"loss": float(totals["loss_sum"]) / n, "accuracy": float(totals["correct"]) / n}
    return evaluate


def initial_params(setup: ShardedTraining, init_hf_dir: str | None,
                   init_params_dir: str | None) -> Any | None:
    """The starting weights (None: random init), read only when a run starts from scratch.
    A params checkpoint in the model's layer layout restores straight into its shardings."""
    model = setup.model
    if init_hf_dir:
        return hf.load_hf(init_hf_dir, **model.runtime_fields())[1]
    if init_params_dir:
        if load_config(init_params_dir).scan_layers == model.scan_layers:
            return load_params(init_params_dir, shardings=setup.param_shardings)[1]
        return load_params(init_params_dir, scan_layers=model.scan_layers, to_host=True)[1]
    return None


def train_sft(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
              partitioner: Partitioner | None = None, stage: str = "sft",
              learning_rate: float = 2e-5, warmup_steps: int = 0, decay: str = "cosine",
              final_learning_rate_ratio: float = 0.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
              z_loss: float = 0.0, num_micro_batches: int = 1,
              logits_chunk_size: int | None = None, checkpoint_every: int = 100,
              keep_checkpoints: int = 3, async_checkpoints: bool = True,
              eval_data: Any = None, eval_batches: int = 4, eval_every: int = 0,
              init_hf_dir: str | None = None, init_params_dir: str | None = None,
              seed: int = 0, peak_tflops: float | None = None) -> dict:
    """The SFT job: trains (or resumes) into WORKDIR/<stage>/ and exports the final params to
    WORKDIR/<stage>/final (a params checkpoint the next stage loads). `train_data` and
    `eval_data` have `.batches(start_step)` and `.seq_len` (e.g. data.sft_data.SftData)."""
    stage_dir = os.path.join(workdir, stage)
    done = finished_summary(stage_dir, stage)
    if done is not None:
        return done
    started = time.perf_counter()
    partitioner = partitioner or Partitioner()
    model = initial_model(model, init_hf_dir, init_params_dir)
    data_vocab = getattr(getattr(train_data, "vocab", None), "vocab_size", 0)
    if data_vocab > model.vocab_size:
        raise ConfigError(f"the data's vocabulary has {data_vocab} ids but the model only "
                          f"{model.vocab_size} (vocab_size)")
    if hasattr(train_data, "report") and jax.process_index() == 0:
        print(f"[{stage}] train data: {train_data.report()}")

    schedule = train_state.make_schedule(learning_rate, train_steps, warmup_steps, decay,
                                         final_learning_rate_ratio)
    optimizer = train_state.make_optimizer(schedule, b1=b1, b2=b2, eps=eps,
                                           weight_decay=weight_decay,
                                           max_grad_norm=max_grad_norm)
    setup = ShardedTraining.create(model, partitioner, optimizer, seed)
    loss_fn = sft_loss_fn(model, z_loss=z_loss, chunk_size=logits_chunk_size)
    step_fn = setup.partition_step(make_train_step(loss_fn, optimizer, schedule,
                                                   num_micro_batches))
    eval_fn = None
    if eval_data is not None:
        eval_fn = make_eval_fn(setup.partition_eval(make_eval_step(loss_fn)), partitioner,
                               eval_data, eval_batches)

    state, summary = train_loop(
        stage_dir=stage_dir, num_steps=train_steps, partitioner=partitioner,
        init_state=lambda: setup.init_state(initial_params(setup, init_hf_dir, init_params_dir)),
        abstract_state=setup.abstract_state,
        train_step=step_fn, batches=train_data.batches, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints,
        eval_fn=eval_fn, eval_every=eval_every,
        flops_per_token=model.train_flops_per_token(train_data.seq_len),
        peak_tflops=peak_tflops, description=stage)
    export_dir = os.path.join(stage_dir, EXPORT_DIR)
    save_params(export_dir, model, state.params)
    summary.update(stage=stage, export_dir=export_dir, num_params=model.num_params(),
                   wall_time_s=round(time.perf_counter() - started, 2))
    write_summary(stage_dir, summary)
    if jax.process_index() == 0:
        print(f"[{stage}] done: {train_steps} steps, final loss "
              f"{summary['final_train_loss']}, params → {export_dir}")
    return summary
