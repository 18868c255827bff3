"""The one attention function: causal, packed-segment and GQA aware; it picks the kernel.

Shapes: query [B, T, N, H]; key and value [B, S, K, H] with N a multiple of K (GQA; MHA when
K == N, MQA when K == 1). segment_ids [B, S] (with T == S) keep attention inside a segment of a
packed row; an explicit boolean `mask` [B, T, S] (True = attend) covers everything else, e.g.
a KV cache during decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(query_len: int, key_len: int, *, causal: bool = True,
                   segment_ids: jax.Array | None = None,
                   mask: jax.Array | None = None) -> jax.Array | None:
    """The boolean [B|1, T, S] mask that causal + segments + an explicit mask amount to."""
    combined = None
    if causal:
        combined = jnp.tril(jnp.ones((query_len, key_len), dtype=bool))[None]
    if segment_ids is not None:
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        combined = same_segment if combined is None else combined & same_segment
    if mask is not None:
        combined = mask if combined is None else combined & mask
    return combined


def reference_attention(query, key, value, mask=None):
    """Plain softmax attention with fp32 logits: the ground truth the kernels are tested against."""
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    q = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key,
                        preferred_element_type=jnp.float32) / jnp.sqrt(head_dim).astype(
                            jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, value)
    return out.reshape(batch, q_len, num_heads, head_dim)


def select_implementation(requested: str, dtype, head_dim: int, has_mask: bool) -> str:
    """'auto' → cuDNN flash attention where it applies (GPU, half precision, no extra mask);
    the grouped einsum on CPU (1.1-1.5x faster there than XLA's version, bench/forward.py,
    which repeats K/V per group); XLA's fused attention elsewhere."""
    if requested != "auto":
        return requested
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half and head_dim in (64, 128) and not has_mask:
        return "cudnn"
    if backend == "cpu":
        return "reference"
    return "xla"


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          causal: bool = True, segment_ids: jax.Array | None = None,
                          mask: jax.Array | None = None,
                          implementation: str = "auto") -> jax.Array:
    """Attention output [B, T, N, H]; see the module docstring for shapes."""
    q_len, k_len = query.shape[1], key.shape[1]
    if causal and q_len != k_len:
        raise ValueError(f"causal attention by index needs query_len == key_len, got "
                         f"{q_len} and {k_len}; pass causal=False and an explicit mask instead")
    has_extra_mask = segment_ids is not None or mask is not None
    impl = select_implementation(implementation, query.dtype, query.shape[-1], has_extra_mask)
    if impl == "reference":
        full_mask = attention_mask(q_len, k_len, causal=causal, segment_ids=segment_ids,
                                   mask=mask)
        return reference_attention(query, key, value, full_mask)
    if impl == "cudnn" and not has_extra_mask:
        return jax.nn.dot_product_attention(query, key, value, is_causal=causal,
                                            implementation="cudnn")
    extra = attention_mask(q_len, k_len, causal=False, segment_ids=segment_ids, mask=mask)
    if extra is not None:
        extra = extra[:, None]  # broadcast over heads: [B, 1, T, S]
    return jax.nn.dot_product_attention(query, key, value, mask=extra, is_causal=causal,
                                        implementation=None if impl == "xla" else impl)
