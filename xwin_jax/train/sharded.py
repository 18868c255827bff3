"""Where a training stage starts, and the sharded pieces every stage builds the same way.

    start = Start.resolve(model, init_dir, vocabulary)    # config + tokenizer + checkpoint
    setup = ShardedTraining.create(spec(SCORE), start.config, partitioner, optimizer, seed)
    state = setup.init_state(setup.initial_params(start.checkpoint))   # None: random init
    step = setup.partition_step(make_train_step(loss_fn, optimizer, schedule,
                                                compute_params=setup.compute_params))

`setup.compute_params` is params → the weights a loss reads: every matrix cast to the compute
dtype on its own shard, so FSDP all-gathers move bf16 by construction (not by the grace of
XLA's sharding propagation), while the master weights and the optimizer state stay fp32 and
sharded (the gradients flow back to them through the cast). The token embedding and a score
model's scalar head keep their master weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from xwin_jax.checkpoints.manager import abstract_like
from xwin_jax.data.vocabulary import resolve_vocabulary
from xwin_jax.models.config import LlamaConfig
from xwin_jax.errors import ConfigError
from xwin_jax.models.spec import (LM, Checkpoint, ModelSpec, check_context,
                                  compute_weights, open_checkpoint, place, spec)
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import train_loop


@dataclasses.dataclass(frozen=True)
class Start:
    """What a stage starts from: the model config (the checkpoint's architecture, the gin
    model's numerics), the checkpoint (None: a random init) and the vocabulary (the one the
    checkpoint records unless `vocabulary` overrides it; bytes for a random init)."""
    config: LlamaConfig
    checkpoint: Checkpoint | None
    vocabulary: Any

    @classmethod
    def resolve(cls, model: LlamaConfig, init_dir: str | None, vocabulary: Any = None, *,
                what: str = "init_dir") -> "Start":
        ckpt = open_checkpoint(init_dir, model, what=what) if init_dir else None
        cfg = ckpt.config if ckpt else model
        vocab = resolve_vocabulary(vocabulary, ckpt.vocabulary if ckpt else None,
                                   cfg.vocab_size, ckpt.path if ckpt else None)
        return cls(cfg, ckpt, vocab)

    @classmethod
    def policy(cls, model: LlamaConfig, ckpt_dir: str | None, vocabulary: Any = None, *,
               what: str = "POLICY_DIR") -> "Start":
        """A language model to sample from or start a policy from: it must be given and hold
        an LM (a params checkpoint or an HF directory)."""
        if not ckpt_dir:
            raise ConfigError(f"{what}: no checkpoint given",
                              hint="give a language model: a stage's final/ (e.g. "
                                   "WORKDIR/sft/final) or an HF directory")
        start = cls.resolve(model, ckpt_dir, vocabulary, what=what)
        if start.checkpoint.kind != LM:
            raise ConfigError(f"{what}={start.checkpoint.path} holds a "
                              f"{start.checkpoint.kind!r} model, not a language model",
                              hint="give a language model: a stage's final/ (e.g. "
                                   "WORKDIR/sft/final) or an HF directory")
        return start

    def fingerprint(self) -> dict:
        return {"model": self.config, "checkpoint": self.checkpoint,
                "vocabulary": self.vocabulary.fingerprint()}

    def bind(self, *datasets: Any) -> list[Any]:
        """Each data set (None stays None) bound to this vocabulary, its sequence length
        checked against the model's context."""
        for data in datasets:
            if data is not None:
                check_context(self.config, getattr(data, "seq_len", None))
        return [None if data is None else data.with_vocabulary(self.vocabulary)
                for data in datasets]


def state_shardings(partitioner: Partitioner, optimizer: optax.GradientTransformation,
                    abstract_state: train_state.TrainState, param_shardings: Any
                    ) -> train_state.TrainState:
    """Optimizer moments shard like their params; scalars (step, counts) are replicated."""
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: partitioner.replicated)
    return train_state.TrainState(step=partitioner.replicated, params=param_shardings,
                                  opt_state=opt)


def _keeps_master(path) -> bool:
    """Whether compute_params leaves this param in its master dtype: the token embedding (an
    LM's or a score model's trunk's); compute_weights already keeps norms and a score head."""
    return "embed_tokens" in [getattr(k, "key", None) for k in path]


@dataclasses.dataclass
class ShardedTraining:
    spec: ModelSpec
    model: LlamaConfig
    partitioner: Partitioner
    optimizer: optax.GradientTransformation
    seed: int
    param_shardings: Any
    abstract_state: train_state.TrainState  # ShapeDtypeStructs carrying the shardings
    shardings: train_state.TrainState

    @classmethod
    def create(cls, model_spec: ModelSpec | str, model: LlamaConfig, partitioner: Partitioner,
               optimizer: optax.GradientTransformation, seed: int = 0) -> "ShardedTraining":
        model_spec = spec(model_spec) if isinstance(model_spec, str) else model_spec
        shapes = model_spec.shapes(model)
        param_shardings = partitioner.shardings_for(model_spec.logical_axes(model), shapes)
        abstract = jax.eval_shape(lambda p: train_state.init_state(p, optimizer), shapes)
        shardings = state_shardings(partitioner, optimizer, abstract, param_shardings)
        return cls(model_spec, model, partitioner, optimizer, seed, param_shardings,
                   abstract_like(abstract, shardings), shardings)

    @property
    def compute_params(self) -> Callable[[Any], Any]:
        """params → the weights the loss reads (inside jit): every floating matrix cast to the
        model's compute dtype on its shard (models.spec.compute_weights), so that what an FSDP
        all-gather moves is the compute dtype. For make_train_step / make_eval_step's
        `compute_params`. Two matrices keep their master weights (_keeps_master): the token
        embedding, which is looked up rather than gathered whole and whose gradient is a
        scatter-add that bf16 would round at every repeat of a token, and a score model's
        head ([hidden, 1], read in fp32 by heads.ScoreHead: casting it would round scores)."""
        dtype, shardings = self.model.dtype, self.param_shardings

        def weights(params):
            cast = compute_weights(params, dtype, shardings)
            return jax.tree_util.tree_map_with_path(
                lambda path, w, master: master if _keeps_master(path) else w, cast, params)
        return weights

    def initial_params(self, checkpoint: Checkpoint | None) -> Any | None:
        """The checkpoint's params in this model's kind and shardings (None: random init)."""
        if checkpoint is None:
            return None
        return checkpoint.load(self.spec.kind, self.param_shardings, seed=self.seed)

    def init_state(self, params: Any | None = None) -> train_state.TrainState:
        """From params — host arrays or global arrays already sharded — or, with None, a
        random init computed already sharded."""
        if params is None:
            params = self.partitioner.init(
                lambda: self.spec.init(self.model, jax.random.key(self.seed)),
                self.param_shardings)
        else:
            params = place(params, self.param_shardings)
        init = jax.jit(lambda p: train_state.init_state(p, self.optimizer),
                       out_shardings=self.shardings)
        return init(params)

    def train(self, start: Start, stage_dir: str, train_steps: int, train_step: Callable,
              batches: Callable, **loop: Any) -> tuple[train_state.TrainState, dict]:
        """The training loop (`loop`: checkpointing, eval, hooks, description) from the
        start's checkpoint, or a random init without one; resumes from the stage's latest
        checkpoint instead when there is one."""
        return train_loop(
            stage_dir=stage_dir, num_steps=train_steps, partitioner=self.partitioner,
            init_state=lambda: self.init_state(self.initial_params(start.checkpoint)),
            abstract_state=self.abstract_state, train_step=train_step, batches=batches,
            **loop)

    def partition_step(self, step: Callable) -> Callable:
        """(state, batch) → (state, metrics), state donated, metrics replicated."""
        return self.partitioner.partition(
            step, in_shardings=(self.shardings, self.partitioner.batch_sharding),
            out_shardings=(self.shardings, self.partitioner.replicated), donate_argnums=(0,))

    def partition_eval(self, eval_step: Callable) -> Callable:
        """(params, batch) → replicated outputs."""
        return self.partitioner.partition(
            eval_step, in_shardings=(self.param_shardings, self.partitioner.batch_sharding),
            out_shardings=self.partitioner.replicated)


def frozen_params(checkpoint: Checkpoint, kind: str, partitioner: Partitioner,
                  seed: int = 0) -> tuple[Any, Any]:
    """(params, shardings) of a model that is not trained (a reference policy, a reward
    model), placed in the training layout."""
    model_spec = spec(kind)
    shardings = model_spec.shardings(checkpoint.config, partitioner)
    return checkpoint.load(kind, shardings, seed=seed), shardings

