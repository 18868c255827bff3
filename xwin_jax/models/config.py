"""LlamaConfig: the shape and numerics of a Llama-2-architecture model, and its HF mapping."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from xwin_jax.errors import ConfigError, UserError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "reference")
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM",)  # heads.py adds the sequence classifier
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


class UnsupportedConfigError(UserError, ValueError):
    """An HF config asks for something this model does not implement; names the field."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    # The fields a gin file set explicitly (config.preset's overrides): a stage that takes
    # its architecture from a checkpoint refuses those that contradict it (models/spec.py).
    # Not part of the config's identity or its saved form.
    overridden: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    # Numerics and layout that do not change what a job computes beyond rounding; left out
    # of job fingerprints (fingerprint.py) so a run may resume with, e.g., another remat.
    FINGERPRINT_EXCLUDE = ("scan_layers", "remat_policy", "attention_impl", "overridden")

    def __post_init__(self):
        # Normalise dtypes to their canonical names so configs compare and serialise cleanly.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LlamaConfig.num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads} (GQA needs whole groups)")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig head_dim={self.head_dim} must be even for rotary")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"LlamaConfig.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"LlamaConfig.attention_impl={self.attention_impl!r}; choose one of "
                              f"{ATTENTION_IMPLEMENTATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def runtime_fields(self) -> dict[str, Any]:
        """The fields an HF config does not carry: numerics, layout and kernels (as opposed to
        the architecture)."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included), computed from the shapes."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward+backward FLOPs per token: 6 x matmul parameters (the embedding gather is
        free; a tied LM head is a matmul) + 6 x layers x seq_len x hidden for attention."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size * (
            0 if self.tie_word_embeddings else 1)
        return 6.0 * matmul_params + 6.0 * self.num_layers * seq_len * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "overridden"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"overridden"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields: {unknown}")
        return cls(**values)

    # --- Hugging Face ---------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                architectures: tuple[str, ...] = SUPPORTED_HF_ARCHITECTURES,
                **overrides) -> "LlamaConfig":
        """Builds a config from an HF `config.json` dict; refuses what the model cannot do.

        `source` names the file in error messages; `overrides` set our own fields (dtype,
        scan_layers, ...), which HF configs do not carry.
        """

        def unsupported(field, value, why):
            return UnsupportedConfigError(f"{source}: field {field!r} = {value!r}: {why}")

        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise unsupported("model_type", model_type, "only 'llama' is supported")
        for arch in hf.get("architectures") or []:
            if arch not in architectures:
                raise unsupported("architectures", hf["architectures"],
                                  f"supported here: {list(architectures)}")
        rope_theta = hf.get("rope_theta", 10000.0)
        for field in ("rope_parameters", "rope_scaling"):
            if hf.get(field) is not None and not isinstance(hf[field], dict):
                raise unsupported(field, hf[field], "expected an object or null")
        rope_parameters = hf.get("rope_parameters")
        if rope_parameters is not None:
            if rope_parameters.get("rope_type", "default") != "default":
                raise unsupported("rope_parameters", rope_parameters,
                                  "only the default rotary (no scaling) is supported")
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is not None and rope_scaling.get(
                "rope_type", rope_scaling.get("type")) != "default":
            raise unsupported("rope_scaling", rope_scaling,
                              "rotary scaling (linear, dynamic, llama3, yarn) is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag, False):
                raise unsupported(flag, hf[flag], "biases are not supported by this model")
        if hf.get("hidden_act", "silu") != "silu":
            raise unsupported("hidden_act", hf["hidden_act"], "only 'silu' (SwiGLU) is supported")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // num_heads:
            raise unsupported("head_dim", head_dim,
                              f"must equal hidden_size / num_attention_heads = "
                              f"{hf['hidden_size'] // num_heads}")
        values = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )
        values.update(overrides)
        return cls(**values)

    def to_hf(self, *, torch_dtype: str = "float32", bos_token_id: int = 1,
              eos_token_id: int = 2, pad_token_id: int | None = None) -> dict[str, Any]:
        """The `config.json` of `LlamaForCausalLM`, readable by transformers 4.x and 5.x."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }


PRESETS: dict[str, LlamaConfig] = {
    # The offline default: byte vocabulary (256 bytes + specials) rounded up, tiny and fast.
    # fp32 compute and unscanned layers: on CPU both are faster (unscanned by 10-25% in
    # bench/forward.py: XLA:CPU zero-fills and slices the stacked scan gradients).
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_seq_len=512, dtype="float32",
                        scan_layers=False),
    "tinyllama_1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                num_layers=22, num_heads=32, num_kv_heads=4, max_seq_len=2048),
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40),
    "llama2_70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A named preset with optional field overrides (the function gin files bind)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown LlamaConfig preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides, overridden=frozenset(overrides))
