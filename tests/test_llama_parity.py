"""Logits parity with transformers.LlamaForCausalLM (PyTorch, fp32) on random tiny configs."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits
from xwin_jax.checkpoints.hf import load_hf
from xwin_jax.models.llama import Llama

CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "rope_theta_500k": dict(rope_theta=500000.0),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_model_dir, case, scan_layers):
    path, model = hf_model_dir(**CASES[case])
    cfg, params = load_hf(path, dtype="float32", scan_layers=scan_layers)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 23))
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens)))
    theirs = hf_logits(model, tokens)
    assert np.abs(theirs).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
