"""The loss output every stage's loss returns, and the one train step built from it.

    def loss_fn(params, batch) -> LossOutput:
        return LossOutput(objective=summed_loss, count=num_tokens, count_name="num_tokens",
                          sums={"nll": nll_sum, "accuracy": correct_sum})

`objective` is a *sum* over the batch of what is minimised and `count` its denominator
(target tokens for SFT, pairs for a reward model or DPO). The step divides once over the
whole batch, which is what makes micro-batching exact, and logs `loss` = objective / count —
exactly what the gradient minimises — and every entry of `sums` divided by the same count.

With `compute_params` (ShardedTraining.compute_params: the fp32 master weights cast to the
compute dtype on their shards), the loss reads the cast copy, made once per step before the
micro-batch loop, so what FSDP all-gathers move is the compute dtype; each micro-batch's
gradient flows back through the cast to the master params (their dtype, their sharding),
where it is accumulated. The optimizer state and the master weights are untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from xwin_jax.errors import ConfigError
from xwin_jax.train.state import all_finite, apply_gradients


@flax.struct.dataclass
class LossOutput:
    objective: jax.Array  # summed over the batch: what the gradient minimises
    count: jax.Array  # the denominator of every reported mean
    sums: dict[str, jax.Array]  # other summed metrics, reported divided by count
    count_name: str = flax.struct.field(pytree_node=False, default="num_tokens")

    def __add__(self, other: "LossOutput") -> "LossOutput":
        return jax.tree.map(jnp.add, self, other)

    def means(self) -> dict[str, jax.Array]:
        """loss and every sum divided by the count (at least 1), plus the count itself."""
        n = jnp.maximum(self.count, 1.0)
        return {"loss": self.objective / n, **{k: v / n for k, v in self.sums.items()},
                self.count_name: self.count}


LossFn = Callable[[Any, dict], LossOutput]


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict, num_micro_batches: int,
                         pullback: Callable[[Any], tuple[Any]] | None = None
                         ) -> tuple[LossOutput, Any]:
    """(summed LossOutput, summed gradients of the objective) over micro-batches of `batch`
    (split on the leading axis): equal to the big batch's, at a fraction of the memory.

    `pullback` (from `jax.vjp(compute_params, master)`, with `params` its output): each
    micro-batch's gradient w.r.t. `params` is pulled back to the master params before it is
    added, so the sum is kept in the master dtype (fp32), not the compute dtype."""
    grad_fn = jax.grad(lambda p, b: (lambda out: (out.objective, out))(loss_fn(p, b)),
                       has_aux=True)

    def grads_of(micro_batch):
        grads, out = grad_fn(params, micro_batch)
        return out, grads if pullback is None else pullback(grads)[0]

    if num_micro_batches == 1:
        return grads_of(batch)

    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ConfigError(f"batch of {x.shape[0]} rows does not split into "
                              f"{num_micro_batches} micro-batches")
        return x.reshape((num_micro_batches, x.shape[0] // num_micro_batches) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, micro_batch):
        out, grads = grads_of(micro_batch)
        acc_out, acc_grads = carry
        return (acc_out + out, jax.tree.map(jnp.add, acc_grads, grads)), None

    out0, grads0 = grads_of(jax.tree.map(lambda x: x[0], micro))
    (out, grads), _ = jax.lax.scan(body, (out0, grads0), jax.tree.map(lambda x: x[1:], micro))
    return out, grads


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, num_micro_batches: int = 1,
                    input_tokens: Callable[[dict], int] = lambda b: b["input_tokens"].size,
                    compute_params: Callable[[Any], Any] | None = None) -> Callable:
    """(state, batch) → (state, metrics) for any stage's loss_fn.

    `compute_params` (e.g. ShardedTraining.compute_params): params → the weights the loss
    reads, applied once per step; the gradients are taken w.r.t. state.params through it
    (they keep the params' dtype). None: the loss reads state.params.

    Metrics: the LossOutput's means, grad_norm, learning_rate, num_input_tokens, and
    `update_finite` (1 or 0): whether the updated params and optimizer state are all finite;
    the loop refuses to save a state where it is 0."""
    def step(state, batch):
        if compute_params is None:
            out, grads = accumulate_gradients(loss_fn, state.params, batch, num_micro_batches)
        else:
            weights, pullback = jax.vjp(compute_params, state.params)
            out, grads = accumulate_gradients(loss_fn, weights, batch, num_micro_batches,
                                              pullback)
        n = jnp.maximum(out.count, 1.0)
        # Keep each gradient in its parameter dtype: an fp32 count would promote bf16
        # gradients, and with them AdamW's moments, changing the state's dtypes after step 1.
        grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), grads)
        metrics = dict(out.means(), grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state.step),
                       num_input_tokens=jnp.asarray(input_tokens(batch), jnp.float32))
        state = apply_gradients(state, grads, optimizer)
        metrics["update_finite"] = all_finite(state.params, state.opt_state).astype(jnp.float32)
        return state, metrics
    return step


def make_eval_step(loss_fn: LossFn, compute_params: Callable[[Any], Any] | None = None
                   ) -> Callable[[Any, dict], LossOutput]:
    """(params, batch) → the batch's LossOutput; add them up over an eval set, then means().
    `compute_params`: as make_train_step's (the loss reads compute_params(params))."""
    def step(params, batch):
        return loss_fn(params if compute_params is None else compute_params(params), batch)
    return step
