"""Direct preference optimisation on preference pairs (Xwin-Pair or RS pairs).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))   (summed over the
                                                                             response tokens)
    sigmoid: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             (eps = label_smoothing, the conservative DPO of noisy labels)
    ipo:     loss = (h - 1 / (2 beta))^2
    + sft_weight x the chosen response's mean token NLL (RPO, TRL's rpo_alpha): keeps the
      chosen answers likely, which small models otherwise lose along with the rejected ones

The reference log-probs are computed once, before training, and cached in the stage directory
(a rerun reuses them). Implicit rewards are beta x the log-ratio of each side; expect both to
fall while their margin grows.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.checkpoints.params import checkpoint_digest, save_params
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import finished_summary, train_loop, write_summary
from xwin_jax.train.sft import initial_params
from xwin_jax.train.sharded import ShardedTraining, initial_model, put_global

EXPORT_DIR = "final"
REFERENCE_FILE = "reference_logps.npz"
SIDES = ("chosen", "rejected")


def sequence_logprobs(cfg: LlamaConfig, params: Any, tokens: jax.Array,
                      response_mask: jax.Array) -> jax.Array:
    """Sum of log p over each right-padded row's response tokens (mask 1) → [B]."""
    logits = Llama(cfg).apply({"params": params}, tokens)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(targets * response_mask[:, 1:], axis=-1)


def pair_logprobs(cfg: LlamaConfig, params: Any, batch) -> tuple[jax.Array, jax.Array]:
    """(log pi(chosen) [B], log pi(rejected) [B]) in one forward pass over both sides."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
    return tuple(jnp.split(sequence_logprobs(cfg, params, tokens, mask), 2))


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair DPO (or IPO) losses from summed sequence log-probs."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) \
            - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    raise ConfigError(f"loss_type={loss_type!r}: choose 'sigmoid' or 'ipo'")


def dpo_loss_fn(cfg: LlamaConfig, beta: float = 0.1, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0, sft_weight: float = 0.0):
    """(params, batch) → (summed loss, sums) for state.make_train_step(count='num_pairs');
    the batch carries chosen_ref_logp / rejected_ref_logp."""
    def loss_fn(params, batch):
        chosen, rejected = pair_logprobs(cfg, params, batch)
        chosen_tokens, rejected_tokens = (
            jnp.maximum(jnp.sum(batch[f"{side}_response_mask"][:, 1:], axis=-1), 1)
            for side in SIDES)
        if loss_type == "ipo":  # IPO's target 1/(2 beta) is per token: mean log-probs (TRL)
            losses = dpo_losses(chosen / chosen_tokens, rejected / rejected_tokens,
                                batch["chosen_ref_logp"] / chosen_tokens,
                                batch["rejected_ref_logp"] / rejected_tokens, beta, loss_type)
        else:
            losses = dpo_losses(chosen, rejected, batch["chosen_ref_logp"],
                                batch["rejected_ref_logp"], beta, loss_type, label_smoothing)
        chosen_nll = -chosen / chosen_tokens
        chosen_reward = beta * (chosen - batch["chosen_ref_logp"])
        rejected_reward = beta * (rejected - batch["rejected_ref_logp"])
        sums = {"loss_sum": jnp.sum(losses), "chosen_nll_sum": jnp.sum(chosen_nll),
                "chosen_reward_sum": jnp.sum(chosen_reward),
                "rejected_reward_sum": jnp.sum(rejected_reward),
                "margin_sum": jnp.sum(chosen_reward - rejected_reward),
                "correct": jnp.sum((chosen_reward > rejected_reward).astype(jnp.float32)),
                "num_pairs": jnp.asarray(chosen.shape[0], jnp.float32)}
        return sums["loss_sum"] + sft_weight * sums["chosen_nll_sum"], sums
    return loss_fn


def reference_logprobs(logprob_fn, partitioner: Partitioner, arrays: dict[str, np.ndarray],
                       batch_size: int) -> dict[str, np.ndarray]:
    """chosen_ref_logp / rejected_ref_logp [N] for every pair, in batches (the last one
    padded by repeating its final row)."""
    n = len(arrays["chosen_tokens"])
    out = {f"{side}_ref_logp": np.zeros(n, np.float32) for side in SIDES}
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = {k: arrays[k][rows] for k in ("chosen_tokens", "rejected_tokens",
                                              "chosen_response_mask", "rejected_response_mask")}
        chosen, rejected = jax.device_get(logprob_fn(partitioner.shard_batch(batch)))
        count = min(batch_size, n - start)
        out["chosen_ref_logp"][start:start + count] = chosen[:count]
        out["rejected_ref_logp"][start:start + count] = rejected[:count]
    return out


def _fingerprint(arrays: dict[str, np.ndarray], reference_dir: str) -> str:
    """What the cached reference log-probs depend on: the tokenized pairs and the reference
    policy's contents (not its path: a policy retrained into the same directory differs)."""
    digest = hashlib.sha256(checkpoint_digest(reference_dir).encode())
    for key in ("chosen_tokens", "rejected_tokens", "chosen_response_mask",
                "rejected_response_mask"):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def train_dpo(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
              partitioner: Partitioner | None = None, stage: str = "dpo", beta: float = 0.1,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              sft_weight: float = 0.0, learning_rate: float = 5e-7, warmup_steps: int = 0, decay: str = "cosine",
              weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
              checkpoint_every: int = 100, keep_checkpoints: int = 3,
              async_checkpoints: bool = True, init_hf_dir: str | None = None,
              init_params_dir: str | None = None, seed: int = 0) -> dict:
    """Trains (or resumes) a DPO policy into WORKDIR/<stage>/ from the SFT/RS policy (which is
    also the frozen reference); exports WORKDIR/<stage>/final. `train_data` is a
    data.pairs_data.PairsData."""
    stage_dir = os.path.join(workdir, stage)
    done = finished_summary(stage_dir, stage)
    if done is not None:
        return done
    if not (init_hf_dir or init_params_dir):
        raise ConfigError("DPO starts from a policy: set init_params_dir (e.g. WORKDIR/sft/final)"
                          " or init_hf_dir; it is also the reference")
    started = time.perf_counter()
    partitioner = partitioner or Partitioner()
    cfg = initial_model(model, init_hf_dir, init_params_dir)
    schedule = train_state.make_schedule(learning_rate, train_steps, warmup_steps, decay)
    optimizer = train_state.make_optimizer(schedule, weight_decay=weight_decay,
                                           max_grad_norm=max_grad_norm)
    setup = ShardedTraining.create(cfg, partitioner, optimizer, seed)

    reference_path = os.path.join(stage_dir, REFERENCE_FILE)
    fingerprint = _fingerprint(train_data.arrays, init_hf_dir or init_params_dir)
    reference = None
    if os.path.exists(reference_path):
        with np.load(reference_path) as cached:
            reference = {k: cached[k] for k in cached.files}
        if str(reference.pop("fingerprint", "")) != fingerprint:
            raise ConfigError(
                f"{reference_path} was computed for other pairs, seq_len or reference policy "
                f"(the reference's contents changed, or the pairs did)",
                hint=f"train into a new WORKDIR (or stage), or delete {stage_dir} to start "
                     f"this stage over: its checkpoints were trained against the old reference")
    if reference is None:
        reference_params = initial_params(setup, init_hf_dir, init_params_dir)
        reference_params = jax.tree.map(
            lambda x, s: x if isinstance(x, jax.Array) else put_global(np.asarray(x), s),
            reference_params, setup.param_shardings)
        logprob_fn = partitioner.partition(
            lambda params, batch: pair_logprobs(cfg, params, batch),
            in_shardings=(setup.param_shardings, partitioner.batch_sharding),
            out_shardings=partitioner.replicated)
        reference = reference_logprobs(lambda b: logprob_fn(reference_params, b), partitioner,
                                       train_data.arrays, train_data.batch_size)
        del reference_params
        if jax.process_index() == 0:
            os.makedirs(stage_dir, exist_ok=True)
            np.savez(reference_path + ".partial.npz", fingerprint=np.asarray(fingerprint),
                     **reference)
            os.replace(reference_path + ".partial.npz", reference_path)
    train_data.arrays.update(reference)

    step = setup.partition_step(train_state.make_train_step(
        dpo_loss_fn(cfg, beta, loss_type, label_smoothing, sft_weight), optimizer, schedule,
        count="num_pairs",
        input_tokens=lambda b: b["chosen_tokens"].size + b["rejected_tokens"].size))
    state, summary = train_loop(
        stage_dir=stage_dir, num_steps=train_steps, partitioner=partitioner,
        init_state=lambda: setup.init_state(initial_params(setup, init_hf_dir,
                                                           init_params_dir)),
        abstract_state=setup.abstract_state, train_step=step, batches=train_data.batches,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, description=stage)
    export_dir = os.path.join(stage_dir, EXPORT_DIR)
    save_params(export_dir, cfg, state.params)
    summary.update(stage=stage, export_dir=export_dir,
                   wall_time_s=round(time.perf_counter() - started, 2))
    write_summary(stage_dir, summary)
    if jax.process_index() == 0:
        print(f"[{stage}] done: {train_steps} steps, final loss {summary['final_train_loss']}, "
              f"params → {export_dir}")
    return summary
