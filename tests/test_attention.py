"""The attention function against a NumPy softmax loop, for every kernel it can pick."""

import jax.numpy as jnp
import numpy as np
import pytest

from xwin_jax.models.attention import dot_product_attention


def numpy_attention(q, k, v, segment_ids, causal):
    batch, q_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for t in range(q_len):
                allowed = [s for s in range(k.shape[1])
                           if (not causal or s <= t)
                           and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t])]
                logits = np.array([q[b, t, h] @ k[b, s, h // groups]
                                   for s in allowed]) / np.sqrt(dim)
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                out[b, t, h] = sum(w * v[b, s, h // groups] for w, s in zip(weights, allowed))
    return out


@pytest.mark.parametrize("implementation", ["xla", "reference", "auto"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_numpy(implementation, kv_heads, packed):
    rng = np.random.default_rng(kv_heads)
    q = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
    segment_ids = (np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 2, 2, 0]])
                   if packed else None)
    expected = numpy_attention(q, k, v, segment_ids, causal=True)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
                                segment_ids=None if segment_ids is None
                                else jnp.asarray(segment_ids),
                                implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_explicit_mask_without_causal():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[[True, False, True], [True, True, False], [False, False, True]]])
    ref = dot_product_attention(q, k, v, causal=False, mask=mask, implementation="reference")
    xla = dot_product_attention(q, k, v, causal=False, mask=mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=1e-5)
    # Row 2 sees only key 2: its output is exactly value 2.
    np.testing.assert_allclose(np.asarray(ref)[0, 2], np.asarray(v)[0, 2], atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_causal_needs_square_or_mask(implementation):
    x = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="query_len == key_len"):
        dot_product_attention(x, jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 2, 4)),
                              implementation=implementation)
