"""The Llama-2 architecture as Flax linen modules, applied with explicit params.

    logits = Llama(cfg).apply({'params': params}, tokens, positions=..., segment_ids=...)

Parameter tree (scanned layout; the unscanned one has `layers_0`, `layers_1`, ... instead of a
stacked `layers`), with the logical axis names the partitioner maps onto the mesh:

    embed_tokens/embedding            [vocab, embed]
    layers/input_norm/scale           [layers, norm]
    layers/attention/{q,k,v}_proj/kernel  [layers, embed, heads|kv_heads, head_dim]
    layers/attention/o_proj/kernel    [layers, heads, head_dim, embed]
    layers/post_attention_norm/scale  [layers, norm]
    layers/mlp/{gate,up}_proj/kernel  [layers, embed, mlp]
    layers/mlp/down_proj/kernel       [layers, mlp, embed]
    final_norm/scale                  [norm]
    lm_head/kernel                    [embed, vocab]   (absent with tied embeddings)

Rotary uses HF's rotate-half layout, so HF conversion is renames, reshapes and transposes only.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.models.attention import dot_product_attention
from xwin_jax.models.config import PRESETS, LlamaConfig, preset  # noqa: F401  (re-exported)

Params = Any
LAYERS = "layers"
KERNEL_INIT_STD = 0.02  # Llama's initializer_range

REMAT_POLICY_FNS = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Activation logical names differ from parameter names so that, e.g., the embed axis of a
# weight can be FSDP-sharded while the embed axis of an activation stays whole.
ACT_BSD = ("act_batch", "act_length", "act_embed")
ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_head_dim")
ACT_KV_HEADS = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")
ACT_MLP = ("act_batch", "act_length", "act_mlp")
ACT_VOCAB = ("act_batch", "act_length", "act_vocab")


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """0-based positions that restart wherever the segment id changes along a row."""
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], dtype=bool),
         segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - segment_start


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions for a left- (or right-) padded batch: real tokens count 0, 1, 2, ..."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos and sin [B, S, head_dim] in fp32, HF rotate-half layout (frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, N, head_dim] rotated by the tables; computed in fp32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _kernel(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str],
            param_dtype) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(KERNEL_INIT_STD), tuple(axes))
    return module.param(name, init, tuple(shape), param_dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def token_matmul(x: jax.Array, kernel: jax.Array, num_in_dims: int, **kwargs) -> jax.Array:
    """x [B, S, *in] · kernel [*in, *out] → [B, S, *out], computed as one 2-D matmul.

    Merging (batch, seq) and the kernel's input and output axes makes every dot in the forward
    and backward pass contract exactly one dimension. XLA:CPU runs multi-dimension
    contractions on a slow path (2-3x slower measured here, bench/forward.py); on GPU and TPU
    the reshapes are free bitcasts.
    """
    in_shape, out_shape = kernel.shape[:num_in_dims], kernel.shape[num_in_dims:]
    fan_in = int(np.prod(in_shape))
    flat = jnp.matmul(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1), **kwargs)
    return flat.reshape(x.shape[:2] + out_shape)


class Projection(nn.Module):
    """A bias-free linear map over a named kernel [*in_features, *out_features]."""
    in_features: Sequence[int]
    out_features: Sequence[int]
    axes: Sequence[str]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, **kwargs):
        shape = tuple(self.in_features) + tuple(self.out_features)
        kernel = _kernel(self, "kernel", shape, self.axes, self.param_dtype)
        return token_matmul(x.astype(self.dtype), kernel.astype(self.dtype),
                            len(self.in_features), **kwargs)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, cache_index=None,
                 attention_mask=None):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, n, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def project_in(name, heads, head_axis):
            return Projection((d,), (heads, hd), ("embed", head_axis, "head_dim"), dtype,
                              pdtype, name=name)(x)

        q = apply_rotary(project_in("q_proj", n, "heads"), cos, sin)
        key = apply_rotary(project_in("k_proj", k, "kv_heads"), cos, sin)
        value = project_in("v_proj", k, "kv_heads")
        q = nn.with_logical_constraint(q, ACT_HEADS)
        key = nn.with_logical_constraint(key, ACT_KV_HEADS)
        value = nn.with_logical_constraint(value, ACT_KV_HEADS)
        new_cache = None
        if cache is None:
            out = dot_product_attention(q, key, value, causal=True, segment_ids=segment_ids,
                                        implementation=cfg.attention_impl)
        else:
            # Decoding: write this call's keys/values at cache_index, attend over the whole
            # cache under the caller's mask (which slots are filled, real and not in the future).
            start = (0, cache_index, 0, 0)
            key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start)
            value = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype),
                                                 start)
            new_cache = {"k": key, "v": value}
            out = dot_product_attention(q, key.astype(q.dtype), value.astype(q.dtype),
                                        causal=False, mask=attention_mask,
                                        implementation=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ACT_HEADS)
        out = Projection((n, hd), (d,), ("heads", "head_dim", "embed"), dtype, pdtype,
                         name="o_proj")(out)
        return out, new_cache


class Mlp(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size

        def project_up(name):
            return Projection((d,), (f,), ("embed", "mlp"), dtype, pdtype, name=name)(x)

        hidden = nn.silu(project_up("gate_proj")) * project_up("up_proj")
        hidden = nn.with_logical_constraint(hidden, ACT_MLP)
        return Projection((f,), (d,), ("mlp", "embed"), dtype, pdtype,
                          name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm SwiGLU, both residual. Returns (x, updated KV cache or
    None), the (carry, output) pair nn.scan expects."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None, cache_index=None,
                 attention_mask=None):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name=name)  # noqa: E731
        attended, new_cache = Attention(cfg, name="attention")(
            norm("input_norm")(x), cos, sin, segment_ids, cache, cache_index, attention_mask)
        x = x + attended
        x = x + Mlp(cfg, name="mlp")(norm("post_attention_norm")(x))
        return nn.with_logical_constraint(x, ACT_BSD), new_cache


def decoder_layer_class(cfg: LlamaConfig):
    """DecoderLayer wrapped in the configured remat policy (and nn.scan when scanned)."""
    layer = DecoderLayer
    if cfg.remat_policy != "none":
        # prevent_cse is only needed outside scan; inside it, it would block optimisations.
        layer = nn.remat(layer, policy=REMAT_POLICY_FNS[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        layer = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        # cos, sin, segment ids, the mask and cache index are shared by all
                        # layers; each layer gets its own slice of the stacked KV cache.
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast,
                                 nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
    return layer


class Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(KERNEL_INIT_STD),
                                            ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.features),
                                    self.param_dtype)

    def __call__(self, tokens):
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        """Tied output projection: x @ embedding.T, accumulated and returned in fp32."""
        return token_matmul(x.astype(self.dtype), self.embedding.astype(self.dtype).T, 1,
                            preferred_element_type=jnp.float32)


class Llama(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, pdtype)
        layer_cls = decoder_layer_class(cfg)
        if cfg.scan_layers:
            self.layers = layer_cls(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"),
                                      dtype, pdtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_hidden: bool = False,
                 cache: dict | None = None, cache_index: jax.Array | None = None,
                 attention_mask: jax.Array | None = None):
        """tokens [B, S] → fp32 logits [B, S, V], or the final-normed hidden states [B, S, D].

        positions default to 0..S-1, restarting per segment when segment_ids are given.
        Decoding: pass `cache` (init_cache: k and v [layers, B, max_len, kv_heads, head_dim]),
        `cache_index` (the slot of tokens[:, 0]) and `attention_mask` [B, S, max_len] (True =
        attend); the call then returns (output, updated cache).
        """
        cfg = self.config
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None else
                         jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)
        x = nn.with_logical_constraint(self.embed_tokens(tokens), ACT_BSD)
        if cfg.scan_layers:
            x, new_cache = self.layers(x, cos, sin, segment_ids, cache, cache_index,
                                       attention_mask)
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
                x, updated = layer(x, cos, sin, segment_ids, layer_cache, cache_index,
                                   attention_mask)
                per_layer.append(updated)
            new_cache = None if cache is None else jax.tree.map(
                lambda *xs: jnp.stack(xs), *per_layer)
        hidden = self.final_norm(x)
        out = hidden if return_hidden else self.logits_from_hidden(hidden)
        return out if cache is None else (out, new_cache)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The LM head alone, so a loss can apply it chunk by chunk over the sequence."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden, preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ACT_VOCAB)


# --- parameters -------------------------------------------------------------------------------

def _init_variables(cfg: LlamaConfig, key: jax.Array):
    return Llama(cfg).init(key, jnp.zeros((1, 1), jnp.int32))


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random parameters (std 0.02, norms at 1), plain arrays without partitioning boxes."""
    return nn.meta.unbox(_init_variables(cfg, key)["params"])


def param_shapes(cfg: LlamaConfig) -> Params:
    """jax.ShapeDtypeStruct for every parameter, without allocating any."""
    abstract = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))
    return nn.meta.unbox(abstract["params"])


def param_logical_axes(cfg: LlamaConfig) -> Params:
    """A PartitionSpec of logical axis names for every parameter (for the partitioner)."""
    abstract = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))
    return nn.get_partition_spec(abstract)["params"]


def init_cache(cfg: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: k and v of shape [layers, batch, max_len, kv_heads, head_dim], in
    the compute dtype unless given."""
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def stack_layers(params: Params, num_layers: int) -> Params:
    """Unscanned layout (layers_0 ... layers_{L-1}) → scanned layout (one stacked `layers`)."""
    per_layer = [params[f"{LAYERS}_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith(f"{LAYERS}_")}
    rest[LAYERS] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return rest


def unstack_layers(params: Params) -> Params:
    """Scanned layout → unscanned layout."""
    stacked = params[LAYERS]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != LAYERS}
    for i in range(num_layers):
        out[f"{LAYERS}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
