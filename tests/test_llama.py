"""Model behaviour beyond HF parity: packing, layouts, remat, configs, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xwin_jax.models import llama
from xwin_jax.models.config import LlamaConfig, preset

CFG = preset("tiny", scan_layers=True)
PARAMS = llama.init_params(CFG, jax.random.key(0))


def forward(cfg, params, tokens, **kwargs):
    return np.asarray(llama.Llama(cfg).apply({"params": params}, jnp.asarray(tokens), **kwargs))


def test_packed_sequences_equal_separate_runs():
    rng = np.random.default_rng(0)
    first, second = rng.integers(3, 500, 7), rng.integers(3, 500, 5)
    packed = np.concatenate([first, second])[None]
    segment_ids = np.array([[1] * 7 + [2] * 5])
    logits = forward(CFG, PARAMS, packed, segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(logits[0, :7], forward(CFG, PARAMS, first[None])[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:], forward(CFG, PARAMS, second[None])[0], atol=1e-5)


def test_positions_from_segments_and_mask():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(llama.positions_from_segments(segments),
                                  [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(llama.positions_from_mask(mask),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_left_padded_row_matches_unpadded():
    tokens = np.array([5, 9, 200, 31, 7])
    padded = np.concatenate([[0, 0, 0], tokens])[None]
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]])
    logits = forward(CFG, PARAMS, padded, positions=llama.positions_from_mask(mask),
                     segment_ids=mask)
    np.testing.assert_allclose(logits[0, 3:], forward(CFG, PARAMS, tokens[None])[0], atol=1e-5)


def test_scanned_and_unscanned_layouts_agree():
    unscanned = llama.unstack_layers(PARAMS)
    assert "layers_1" in unscanned and "layers" not in unscanned
    tokens = np.arange(1, 12)[None]
    np.testing.assert_allclose(forward(CFG.replace(scan_layers=False), unscanned, tokens),
                               forward(CFG, PARAMS, tokens), atol=1e-6)
    restacked = llama.stack_layers(unscanned, CFG.num_layers)
    jax.tree.map(np.testing.assert_array_equal, restacked, PARAMS)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_give_the_same_gradients(policy, scan):
    tokens = jnp.arange(1, 17).reshape(2, 8)

    def loss(cfg, params):
        return jnp.mean(llama.Llama(cfg).apply({"params": params}, tokens) ** 2)

    params = PARAMS if scan else llama.unstack_layers(PARAMS)
    base = CFG.replace(scan_layers=scan)
    expected = jax.grad(lambda p: loss(base, p))(params)
    got = jax.jit(jax.grad(lambda p: loss(base.replace(remat_policy=policy), p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, expected)


def test_return_hidden_then_head_equals_logits():
    tokens = jnp.arange(1, 9)[None]
    model = llama.Llama(CFG)
    hidden = model.apply({"params": PARAMS}, tokens, return_hidden=True)
    assert hidden.shape == (1, 8, CFG.hidden_size)
    logits = model.apply({"params": PARAMS}, hidden, method=llama.Llama.logits_from_hidden)
    np.testing.assert_allclose(np.asarray(logits), forward(CFG, PARAMS, tokens), atol=1e-6)


def test_bf16_compute_stays_close_to_fp32():
    tokens = jnp.arange(1, 33).reshape(2, 16)
    fp32 = forward(CFG, PARAMS, tokens)
    bf16 = forward(CFG.replace(dtype="bfloat16"), PARAMS, tokens)
    assert bf16.dtype == np.float32  # logits are accumulated and returned in fp32
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()


def test_every_parameter_has_logical_axes():
    axes = llama.param_logical_axes(CFG)
    shapes = llama.param_shapes(CFG)
    flat_axes = jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_axes) == len(jax.tree.leaves(shapes))
    for path, spec in flat_axes:
        shape = llama.param_shapes(CFG)
        for key in path:
            shape = shape[key.key]
        assert len(spec) == len(shape.shape) and all(spec), (path, spec)
    assert axes["layers"]["attention"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")


# Parameter counts of the released checkpoints (HF model cards / safetensors metadata).
@pytest.mark.parametrize("name,count", [
    ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
    ("llama2_70b", 68_976_648_192), ("tinyllama_1b", 1_100_048_384)])
def test_preset_parameter_counts(name, count):
    assert preset(name).num_params() == count


def test_num_params_matches_initialised_shapes():
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS))
    assert total == CFG.num_params()


def test_config_hf_round_trip_and_validation():
    cfg = preset("llama2_70b", rope_theta=500000.0)
    back = LlamaConfig.from_hf(cfg.to_hf(), dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    assert back == cfg
    assert back.head_dim == 128
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=32, num_kv_heads=5)
    with pytest.raises(ValueError, match="remat_policy"):
        LlamaConfig(remat_policy="some")
    with pytest.raises(ValueError, match="unknown LlamaConfig preset"):
        preset("gpt2")
