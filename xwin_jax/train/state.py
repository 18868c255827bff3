"""TrainState and the optimizer: AdamW with masked weight decay, warmup + decay, clipping.

Every stage builds its optimizer the same way: an OptimizerConfig (what gin binds) built for
the stage's number of updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + decay schedule (make_schedule)."""
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    decay: str = "cosine"
    final_learning_rate_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def schedule(self, total_steps: int) -> optax.Schedule:
        return make_schedule(self.learning_rate, total_steps, self.warmup_steps, self.decay,
                             self.final_learning_rate_ratio)

    def build(self, total_steps: int
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """(optimizer, schedule) for a run of `total_steps` updates."""
        schedule = self.schedule(total_steps)
        return make_optimizer(schedule, b1=self.b1, b2=self.b2, eps=self.eps,
                              weight_decay=self.weight_decay,
                              max_grad_norm=self.max_grad_norm), schedule


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
