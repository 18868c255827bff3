"""Model kinds and the checkpoints they start from.

A ModelSpec is what a stage needs to know about a kind of model — a language model ('lm', a
Llama) or a score model ('score', a Llama trunk with a scalar head: reward and value models):
how to init it, its parameter shapes and logical axes. A Checkpoint is an input to a stage —
a params checkpoint or an HF directory — opened once:

    ckpt = open_checkpoint(path, model)            # reads configs only, never weights
    ckpt.config       # the architecture from the checkpoint, numerics/layout from `model`
    ckpt.vocabulary   # the tokenizer recorded with it (None: an old checkpoint)
    params = ckpt.load(SCORE, shardings, seed=0)   # an LM checkpoint gives an RM its trunk

The architecture always comes from the checkpoint; the model gin only sets runtime fields
(dtype, param_dtype, scan_layers, remat_policy, attention_impl). An architecture field a gin
file overrides explicitly (config.preset(..., num_layers=4)) and that contradicts the
checkpoint is an error naming the field: it would otherwise be silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.errors import ConfigError
from xwin_jax.models import heads, llama
from xwin_jax.models.config import RUNTIME_FIELDS, LlamaConfig

LM, SCORE = "lm", "score"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str
    init: Callable[[LlamaConfig, jax.Array], Any]
    shapes: Callable[[LlamaConfig], Any]
    logical_axes: Callable[[LlamaConfig], Any]

    def shardings(self, cfg: LlamaConfig, partitioner) -> Any:
        return partitioner.shardings_for(self.logical_axes(cfg), self.shapes(cfg))


SPECS = {
    LM: ModelSpec(LM, llama.init_params, llama.param_shapes, llama.param_logical_axes),
    SCORE: ModelSpec(SCORE, heads.init_reward_params, heads.reward_param_shapes,
                     heads.reward_param_logical_axes),
}


def spec(kind: str) -> ModelSpec:
    if kind not in SPECS:
        raise ConfigError(f"model kind {kind!r}: choose one of {sorted(SPECS)}")
    return SPECS[kind]


def put_global(host_array, sharding):
    """A host array (the same on every process) → a global array, each device taking only
    its shard."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding,
                                        lambda index: host_array[index])


def compute_weights(params: Any, dtype: Any, shardings: Any = None) -> Any:
    """Params with every floating weight matrix (kernels, embeddings) cast to the compute
    dtype; what the model reads in fp32 keeps its dtype: norm scales (`scale`, stacked per
    layer or not) and a score model's head ([hidden, 1], heads.ScoreHead: casting it would
    round the scores). With `shardings` (inside jit), each cast copy is held in its weight's
    sharding, so the cast happens on the shard and what an FSDP all-gather then moves is the
    compute dtype, not the fp32 master weights."""
    dtype = jnp.dtype(dtype)

    def cast(path, x, sharding=None):
        keys = [getattr(k, "key", None) for k in path]
        kept = keys[-1:] == ["scale"] or keys[:1] == [heads.HEAD]
        if kept or x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        x = x.astype(dtype)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    if shardings is None:
        return jax.tree_util.tree_map_with_path(cast, params)
    return jax.tree_util.tree_map_with_path(cast, params, shardings)


def place(params: Any, shardings: Any) -> Any:
    """Host or device params → global arrays in `shardings` (arrays already there stay)."""
    return jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s
                        else put_global(x, s), params, shardings)


def architecture_conflicts(model: LlamaConfig, checkpoint_cfg: LlamaConfig) -> list[str]:
    """The explicitly overridden architecture fields of `model` that differ from the
    checkpoint's, as "field: gin value vs checkpoint value"."""
    return [f"{name}={getattr(model, name)!r} (the checkpoint has "
            f"{getattr(checkpoint_cfg, name)!r})"
            for name in sorted(model.overridden)
            if name not in RUNTIME_FIELDS and getattr(model, name) != getattr(checkpoint_cfg,
                                                                                name)]


def _is_hf_dir(path: str) -> bool:
    from xwin_jax.checkpoints.params import MODEL_CONFIG_FILE
    return (not os.path.exists(os.path.join(path, MODEL_CONFIG_FILE))
            and os.path.exists(os.path.join(path, "config.json")))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened input checkpoint (see the module docstring)."""
    path: str
    config: LlamaConfig
    kind: str  # what it holds: 'lm' or 'score'
    is_hf: bool
    vocabulary: Any  # data.vocabulary.Vocabulary | None

    def fingerprint(self) -> dict:
        """What the checkpoint is, by content: its architecture, a digest of its params and
        its vocabulary — not its path (a retrained checkpoint in the same place differs)."""
        from xwin_jax.checkpoints.params import checkpoint_digest
        content = checkpoint_digest(self.path)
        arch = {k: v for k, v in self.config.to_dict().items() if k not in RUNTIME_FIELDS}
        return {"kind": self.kind, "architecture": arch, "params": content,
                "vocabulary": None if self.vocabulary is None else
                self.vocabulary.fingerprint()}

    def check_vocabulary(self, vocab: Any, what: str) -> None:
        """A model that reads another model's token ids must have been trained on the same
        tokenizer (a checkpoint that records none is taken on trust)."""
        if self.vocabulary is not None and self.vocabulary != vocab:
            raise ConfigError(f"{what}={self.path} records another tokenizer than the "
                              f"policy's: it would read the policy's token ids as other text",
                              hint="train it from the same base model (or give the same "
                                   "`vocabulary` to every stage)")

    def load_host(self, kind: str | None = None, seed: int = 0) -> Any:
        """Params as host arrays in this config's layer layout, converted to `kind`: a score
        model from an LM checkpoint takes its trunk and a fresh head (std 1/sqrt(d+1))."""
        from xwin_jax.checkpoints import hf, params as params_io
        kind = kind or self.kind
        if self.is_hf:
            params = hf.load_hf(self.path, **self.config.runtime_fields())[1]
        else:
            params = params_io.load_params(self.path, scan_layers=self.config.scan_layers,
                                           to_host=True)[1]
        return self._convert(params, kind, seed)

    def _convert(self, params: Any, kind: str, seed: int) -> Any:
        if kind == self.kind:
            return params
        if kind == SCORE and self.kind == LM:
            return heads.reward_params_from_trunk(params, self.config, jax.random.key(seed))
        raise ConfigError(f"{self.path} holds a {self.kind!r} model; a {kind!r} model cannot "
                          f"start from it")

    def load(self, kind: str | None, shardings: Any, seed: int = 0) -> Any:
        """Params as global arrays in `shardings` (a tree for `kind`). A params checkpoint
        of the same kind and layer layout restores straight into the shardings (no host
        copy of the whole model); anything else goes through the host once."""
        from xwin_jax.checkpoints import params as params_io
        kind = kind or self.kind
        if not self.is_hf and kind == self.kind and \
                params_io.load_config(self.path).scan_layers == self.config.scan_layers:
            return params_io.load_params(self.path, shardings=shardings)[1]
        return place(self.load_host(kind, seed), shardings)


def open_checkpoint(path: str, model: LlamaConfig | None = None, *,
                    what: str = "checkpoint") -> Checkpoint:
    """Reads a checkpoint's config, kind and vocabulary (not its weights). `model` gives the
    runtime fields and is checked for contradicting architecture overrides; `what` names the
    setting in errors (e.g. "POLICY_DIR")."""
    from xwin_jax.checkpoints import hf, params as params_io
    from xwin_jax.data.vocabulary import load_vocabulary

    if not path:
        raise ConfigError(f"{what}: no checkpoint path given")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{what}={path}: no such directory",
                          hint="give a params checkpoint (e.g. WORKDIR/sft/final) or an HF "
                               "directory")
    runtime = model.runtime_fields() if model is not None else {}
    is_hf = _is_hf_dir(path)
    if is_hf:
        cfg = hf.read_hf_config(path, **runtime)
        kind = LM
    else:
        cfg = params_io.load_config(path).replace(**runtime)
        kind = params_io.load_head(path)
    if model is not None:
        conflicts = architecture_conflicts(model, cfg)
        if conflicts:
            raise ConfigError(
                f"{what}={path}: the architecture comes from the checkpoint, but the gin "
                f"config overrides {', '.join(conflicts)}",
                hint="drop the override (only dtype, param_dtype, scan_layers, remat_policy "
                     "and attention_impl apply to a model started from a checkpoint), or "
                     "start from a checkpoint with that architecture")
    return Checkpoint(path, cfg, kind, is_hf, load_vocabulary(path))


def check_context(cfg: LlamaConfig, seq_len: int | None, what: str = "SEQ_LEN") -> None:
    """Warns when sequences run past the positions the model was trained on."""
    if seq_len and seq_len > cfg.max_seq_len and jax.process_index() == 0:
        print(f"warning: {what}={seq_len} is longer than the model's context "
              f"(max_seq_len={cfg.max_seq_len}); rotary positions beyond it were never "
              f"trained")
