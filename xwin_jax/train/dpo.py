"""Direct preference optimisation on preference pairs (Xwin-Pair or RS pairs).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))   (summed over the
                                                                             response tokens)
    sigmoid: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             (eps = label_smoothing, the conservative DPO of noisy labels)
    ipo:     loss = (h - 1 / (2 beta))^2
    + sft_weight x the chosen response's mean token NLL (RPO, TRL's rpo_alpha): keeps the
      chosen answers likely, which small models otherwise lose along with the rejected ones

The policy starts from `init_dir`, which is also the frozen reference. The reference
log-probs are computed once, before training, and cached in the stage directory, where they
are valid as long as the stage's fingerprint (the reference checkpoint's contents, the pairs,
the vocabulary) is: a rerun with other inputs is refused by the stage runner, and a cache
that does not match its own record is recomputed. Implicit rewards are beta x the log-ratio
of each side; expect both to fall while their margin grows.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax import fingerprint as fingerprints
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama
from xwin_jax.models.spec import LM
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.reward import pair_input_tokens
from xwin_jax.train.sharded import ShardedTraining, Start
from xwin_jax.train.stage import export, run_stage
from xwin_jax.train.state import OptimizerConfig
from xwin_jax.train.step import LossOutput, make_train_step

REFERENCE_FILE = "reference_logps.npz"
SIDES = ("chosen", "rejected")
LOSS_TYPES = ("sigmoid", "ipo")
PAIR_FIELDS = ("chosen_tokens", "rejected_tokens", "chosen_response_mask",
               "rejected_response_mask")


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


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r}: choose one of "
                          f"{', '.join(map(repr, LOSS_TYPES))}")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair DPO (or IPO) losses from summed sequence log-probs."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) \
            - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    check_loss_type(loss_type)
    return jnp.square(h - 1.0 / (2.0 * beta))


def dpo_loss_fn(cfg: LlamaConfig, beta: float = 0.1, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0, sft_weight: float = 0.0
                ) -> Callable[[Any, dict], LossOutput]:
    """(params, batch) → LossOutput over pairs: objective = DPO loss + sft_weight x the
    chosen answers' mean token NLL, so the logged `loss` is what is minimised (also reported
    per pair: dpo_loss, chosen_nll, chosen_reward, rejected_reward, margin, accuracy). The
    batch carries chosen_ref_logp / rejected_ref_logp."""
    check_loss_type(loss_type)

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
        chosen_reward = beta * (chosen - batch["chosen_ref_logp"])
        rejected_reward = beta * (rejected - batch["rejected_ref_logp"])
        sums = {"dpo_loss": jnp.sum(losses), "chosen_nll": jnp.sum(-chosen / chosen_tokens),
                "chosen_reward": jnp.sum(chosen_reward),
                "rejected_reward": jnp.sum(rejected_reward),
                "margin": jnp.sum(chosen_reward - rejected_reward),
                "accuracy": jnp.sum((chosen_reward > rejected_reward).astype(jnp.float32))}
        return LossOutput(sums["dpo_loss"] + sft_weight * sums["chosen_nll"],
                          jnp.asarray(chosen.shape[0], jnp.float32), sums, "num_pairs")
    return loss_fn


def reference_logprobs(logprob_fn, partitioner: Partitioner, arrays: dict[str, np.ndarray],
                       batch_size: int) -> dict[str, np.ndarray]:
    """chosen_ref_logp / rejected_ref_logp [N] for every pair, in batches (the last one
    padded by repeating its final row)."""
    n = len(arrays["chosen_tokens"])
    out = {f"{side}_ref_logp": np.zeros(n, np.float32) for side in SIDES}
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = {k: arrays[k][rows] for k in PAIR_FIELDS}
        chosen, rejected = jax.device_get(logprob_fn(partitioner.shard_batch(batch)))
        count = min(batch_size, n - start)
        out["chosen_ref_logp"][start:start + count] = chosen[:count]
        out["rejected_ref_logp"][start:start + count] = rejected[:count]
    return out


def cached_reference(stage_dir: str, record: str, compute: Callable[[], dict]
                     ) -> dict[str, np.ndarray]:
    """The reference log-probs cached in STAGE_DIR/reference_logps.npz when it was computed
    for `record` (a digest of the reference and the pairs), else computed and cached."""
    path = os.path.join(stage_dir, REFERENCE_FILE)
    if os.path.exists(path):
        with np.load(path) as cached:
            reference = {k: cached[k] for k in cached.files}
        if str(reference.pop("fingerprint", "")) == record:
            return reference
        print(f"[dpo] {path} was computed for another reference or other pairs: recomputing")
    reference = compute()
    if jax.process_index() == 0:
        np.savez(path + ".partial.npz", fingerprint=np.asarray(record), **reference)
        os.replace(path + ".partial.npz", path)
    return reference


def with_reference(data: Any, reference: dict[str, np.ndarray]) -> Any:
    """A copy of the pairs data whose batches also carry the reference log-probs (the data
    object given is left as it was)."""
    data = copy.copy(data)
    data.arrays = {**data.arrays, **reference}
    return data


def fit(stage_dir: str, start: Start, train_steps: int, train_data: Any, *,
        partitioner: Partitioner, optimizer: OptimizerConfig, beta: float = 0.1,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
        checkpoint_every: int = 100, keep_checkpoints: int = 3, async_checkpoints: bool = True,
        seed: int = 0, description: str = "dpo") -> dict:
    """Trains (or resumes) a DPO policy from `start` (also the reference) into STAGE_DIR and
    exports it (with the tokenizer) to STAGE_DIR/final."""
    cfg = start.config
    tx, schedule = optimizer.build(train_steps)
    setup = ShardedTraining.create(LM, cfg, partitioner, tx, seed)
    if jax.process_index() == 0:
        print(f"[{description}] train data: {train_data.report()}")

    def compute_reference():
        reference_params = setup.initial_params(start.checkpoint)
        weights = setup.compute_params  # forward only: the same logits, half the gathers
        logprob_fn = setup.partition_eval(
            lambda params, batch: pair_logprobs(cfg, weights(params), batch))
        return reference_logprobs(lambda b: logprob_fn(reference_params, b), partitioner,
                                  train_data.arrays, train_data.batch_size)

    record = fingerprints.digest(fingerprints.describe(
        {"reference": start.checkpoint, "pairs": train_data}))
    data = with_reference(train_data, cached_reference(stage_dir, record, compute_reference))
    step = setup.partition_step(make_train_step(
        dpo_loss_fn(cfg, beta, loss_type, label_smoothing, sft_weight), tx, schedule,
        input_tokens=pair_input_tokens, compute_params=setup.compute_params))
    state, summary = setup.train(start, stage_dir, train_steps, step, data.batches,
                                 checkpoint_every=checkpoint_every,
                                 keep_checkpoints=keep_checkpoints,
                                 async_checkpoints=async_checkpoints, description=description)
    export_dir = export(stage_dir, cfg, state.params, start.vocabulary)
    if jax.process_index() == 0:
        print(f"[{description}] {train_steps} steps, final loss "
              f"{summary['final_train_loss']}, params → {export_dir}")
    data_summary = {"pairs": train_data.num_pairs}
    if hasattr(train_data, "pair_skips"):  # made from an Xwin-Set: what gave no pair, and why
        data_summary.update(rejected_rule=train_data.rule.rejected,
                            prompts_skipped=train_data.pair_skips)
    return dict(summary, export_dir=export_dir, train_data=data_summary)


def train_dpo(workdir: str, model: LlamaConfig, train_steps: int, train_data: Any, *,
              partitioner: Partitioner | None = None, stage: str = "dpo", beta: float = 0.1,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              sft_weight: float = 0.0,
              optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7),
              checkpoint_every: int = 100, keep_checkpoints: int = 3,
              async_checkpoints: bool = True, init_dir: str | None = None,
              vocabulary: Any = None, seed: int = 0) -> dict:
    """The DPO job: trains (or resumes) a policy into WORKDIR/<stage>/ from `init_dir` (the
    SFT/RS policy: a params checkpoint or an HF directory, which is also the frozen
    reference) and exports WORKDIR/<stage>/final with the tokenizer. `vocabulary` overrides
    the one the checkpoint records; `train_data` is a data.pairs_data.PairsData (pairs files)
    or XwinSetPairsData (pairs made from rejection sampling's Xwin-Set)."""
    if not init_dir:
        raise ConfigError("DPO starts from a policy: set init_dir (e.g. WORKDIR/sft/final, or "
                          "an HF directory); it is also the reference")
    start = Start.resolve(model, init_dir, vocabulary or getattr(train_data, "vocabulary", None))
    check_loss_type(loss_type)
    train_data, = start.bind(train_data)
    settings = {"start": start, "train_steps": train_steps, "train_data": train_data,
                "optimizer": optimizer, "beta": beta, "loss_type": loss_type,
                "label_smoothing": label_smoothing, "sft_weight": sft_weight, "seed": seed}
    return run_stage(os.path.join(workdir, stage), stage, settings, lambda stage_dir: fit(
        stage_dir, start, train_steps, train_data, partitioner=partitioner or Partitioner(),
        optimizer=optimizer, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        sft_weight=sft_weight, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints, seed=seed,
        description=stage))
