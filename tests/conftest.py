"""Shared fixtures: tiny random HF Llama models written to disk with transformers."""

import os

# Quiet TensorFlow/XLA start-up chatter and keep JAX on the CPU in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests; single-device code simply uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_hf_model(seed=0, **overrides):
    """A random transformers LlamaForCausalLM whose every weight (norms too) is non-trivial."""
    import torch
    import transformers

    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    values.update(overrides)
    config = transformers.LlamaConfig(**values)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            # Random std ~0.15: logits of order 1, so a layout error could not hide in noise.
            param.copy_(torch.randn_like(param) * 0.15 + (1.0 if param.ndim == 1 else 0.0))
    return model


def hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture
def hf_model_dir(tmp_path):
    """Writes a tiny random HF model to disk; returns (dir, model)."""
    def write(**overrides):
        model = make_hf_model(**overrides)
        path = tmp_path / "hf"
        model.save_pretrained(path)
        return str(path), model
    return write
