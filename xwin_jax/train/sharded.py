"""The sharded pieces every stage builds the same way: state shardings, init, the step.

    setup = ShardedTraining.create(model_cfg, partitioner, optimizer, seed)
    state = setup.init_state(host_params)          # or None for a random init
    step = setup.partition_step(make_train_step(loss_fn, optimizer, schedule))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax

from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.manager import abstract_like
from xwin_jax.checkpoints.params import load_config
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import init_params, param_logical_axes
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import state as train_state


def state_shardings(partitioner: Partitioner, optimizer: optax.GradientTransformation,
                    abstract_state: train_state.TrainState, param_shardings: Any
                    ) -> train_state.TrainState:
    """Optimizer moments shard like their params; scalars (step, counts) are replicated."""
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: partitioner.replicated)
    return train_state.TrainState(step=partitioner.replicated, params=param_shardings,
                                  opt_state=opt)


def initial_model(model: LlamaConfig, init_hf_dir: str | None,
                  init_params_dir: str | None) -> LlamaConfig:
    """The config to train: the architecture from the starting checkpoint (if any), numerics
    and layout (dtype, remat, ...) from `model`. Reads configs only, never weights."""
    if init_hf_dir and init_params_dir:
        raise ConfigError("set init_hf_dir or init_params_dir, not both")
    if init_hf_dir:
        return hf.read_hf_config(init_hf_dir, **model.runtime_fields())
    if init_params_dir:
        return load_config(init_params_dir).replace(**model.runtime_fields())
    return model


def put_global(host_array, sharding):
    """A host array (the same on every process) → a global array, each device taking only
    its shard."""
    return jax.make_array_from_callback(host_array.shape, sharding,
                                        lambda index: host_array[index])


@dataclasses.dataclass
class ShardedTraining:
    model: LlamaConfig
    partitioner: Partitioner
    optimizer: optax.GradientTransformation
    seed: int
    param_shardings: Any
    abstract_state: train_state.TrainState  # ShapeDtypeStructs carrying the shardings
    shardings: train_state.TrainState

    init_fn: Callable[[LlamaConfig, jax.Array], Any] = init_params

    @classmethod
    def create(cls, model: LlamaConfig, partitioner: Partitioner,
               optimizer: optax.GradientTransformation, seed: int = 0,
               init_fn: Callable[[LlamaConfig, jax.Array], Any] = init_params,
               logical_axes_fn: Callable[[LlamaConfig], Any] = param_logical_axes
               ) -> "ShardedTraining":
        """init_fn / logical_axes_fn: the model's parameters (default: a Llama LM; a reward
        model passes heads.init_reward_params and heads.reward_param_logical_axes)."""
        shapes = jax.eval_shape(lambda: init_fn(model, jax.random.key(seed)))
        param_shardings = partitioner.shardings_for(logical_axes_fn(model), shapes)
        abstract = jax.eval_shape(lambda p: train_state.init_state(p, optimizer), shapes)
        shardings = state_shardings(partitioner, optimizer, abstract, param_shardings)
        return cls(model, partitioner, optimizer, seed, param_shardings,
                   abstract_like(abstract, shardings), shardings, init_fn)

    def init_state(self, params: Any | None = None) -> train_state.TrainState:
        """From params — host arrays (e.g. an HF import) or global arrays already sharded —
        or, with None, a random init computed already sharded."""
        if params is None:
            params = self.partitioner.init(
                lambda: self.init_fn(self.model, jax.random.key(self.seed)),
                self.param_shardings)
        else:
            params = jax.tree.map(
                lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s
                else put_global(np.asarray(x), s), params, self.param_shardings)
        init = jax.jit(lambda p: train_state.init_state(p, self.optimizer),
                       out_shardings=self.shardings)
        return init(params)

    def partition_step(self, step: Callable) -> Callable:
        """(state, batch) → (state, metrics), state donated, metrics replicated."""
        return self.partitioner.partition(
            step, in_shardings=(self.shardings, self.partitioner.batch_sharding),
            out_shardings=(self.shardings, self.partitioner.replicated), donate_argnums=(0,))

    def partition_eval(self, eval_step: Callable) -> Callable:
        """(params, batch) → replicated metric sums."""
        return self.partitioner.partition(
            eval_step, in_shardings=(self.param_shardings, self.partitioner.batch_sharding),
            out_shardings=self.partitioner.replicated)
