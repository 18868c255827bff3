"""TrainState and the optimizer: AdamW with masked weight decay, warmup + decay, clipping."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from xwin_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(peak_learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "cosine", final_learning_rate_ratio: float = 0.0
                  ) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine, linear or no decay to
    peak * final_learning_rate_ratio at total_steps."""
    end = peak_learning_rate * final_learning_rate_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak_learning_rate, decay_steps,
                                            alpha=final_learning_rate_ratio)
    elif decay == "linear":
        after = optax.linear_schedule(peak_learning_rate, end, decay_steps)
    elif decay == "constant":
        after = optax.constant_schedule(peak_learning_rate)
    else:
        raise ConfigError(f"decay={decay!r}: choose 'cosine', 'linear' or 'constant'")
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


NO_DECAY_LEAVES = ("scale", "bias")


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: everything but norm scales and biases. By name, not
    ndim, because scanned layers stack a norm's [D] scale into [layers, D]."""
    def applies(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(applies, params)


def make_optimizer(schedule: optax.Schedule | float, *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked to matrices)."""
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def apply_gradients(state: TrainState, grads: Any,
                    optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def all_finite(*trees: Any) -> jax.Array:
    """True when every floating-point element of the trees is finite: one fused reduction
    inside the step, so a non-finite update is caught before anything saves it."""
    leaves = [x for tree in trees for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.asarray(True)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]], params: Any,
                         batch: dict, num_micro_batches: int):
    """Gradients of loss_fn summed over micro-batches of `batch` (split on the leading axis).

    loss_fn returns (a *sum* over the micro-batch, metric sums); because the normalisation
    happens once over the whole batch afterwards, the result equals the big-batch gradient.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss, sums), grads = grad_fn(params, batch)
        return loss, sums, grads

    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ConfigError(f"batch of {x.shape[0]} rows does not split into "
                              f"{num_micro_batches} micro-batches")
        return x.reshape((num_micro_batches, x.shape[0] // num_micro_batches) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, micro_batch):
        (loss, sums), grads = grad_fn(params, micro_batch)
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_sums, sums),
                jax.tree.map(jnp.add, acc_grads, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss0, sums0), grads0 = grad_fn(params, first)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, sums, grads), _ = jax.lax.scan(body, (loss0, sums0, grads0), rest)
    return loss, sums, grads


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, num_micro_batches: int = 1,
                    count: str = "num_tokens",
                    input_tokens: Callable[[dict], int] = lambda b: b["input_tokens"].size
                    ) -> Callable:
    """(state, batch) → (state, metrics) for any loss_fn returning (summed objective, sums).

    Gradients and every `*_sum` metric are divided by sums[count] over the whole batch (target
    tokens for SFT, pairs for a reward model), which is what makes micro-batching exact;
    `correct` becomes `accuracy`. `update_finite` (1 or 0) says whether the updated params and
    optimizer state are all finite; the loop refuses to save a state where it is 0."""
    def step(state, batch):
        _, sums, grads = accumulate_gradients(loss_fn, state.params, batch, num_micro_batches)
        n = jnp.maximum(sums[count], 1.0)
        # Keep each gradient in its parameter dtype: an fp32 count would promote bf16
        # gradients, and with them AdamW's moments, changing the state's dtypes after step 1.
        grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), grads)
        metrics = {name[:-len("_sum")]: value / n for name, value in sums.items()
                   if name.endswith("_sum")}
        metrics.update(accuracy=sums["correct"] / n, grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state.step),
                       num_input_tokens=jnp.asarray(input_tokens(batch), jnp.float32))
        metrics[count] = sums[count]
        state = apply_gradients(state, grads, optimizer)
        metrics["update_finite"] = all_finite(state.params, state.opt_state).astype(jnp.float32)
        return state, metrics
    return step
