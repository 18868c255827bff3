"""The partitioner: mesh sizes, rules, and a sharded SFT step equal to the single-device one."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xwin_jax.data.toy import ReverseTask
from xwin_jax.models import llama
from xwin_jax.models.config import preset
from xwin_jax.partitioning import Partitioner, resolve_mesh_shape
from xwin_jax.train import sft
from xwin_jax.train import state as train_state
from xwin_jax.train.sharded import ShardedTraining
from xwin_jax.train.step import make_train_step


def test_resolve_mesh_shape():
    assert resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown"):
        resolve_mesh_shape({"model": 2}, 8)


def test_rules_and_divisibility_fallback():
    part = Partitioner({"data": 1, "fsdp": 2, "tensor": 4})
    assert part.spec(("embed", "heads", "head_dim"), (64, 8, 16)) == P("fsdp", "tensor", None)
    # 2 KV heads cannot split 4 ways: the axis stays whole instead of failing.
    assert part.spec(("embed", "kv_heads", "head_dim"), (64, 2, 16)) == P("fsdp", None, None)
    assert part.spec(("act_batch", "act_length"), (8, 5)) == P("fsdp", None)
    both = Partitioner({"data": 2, "fsdp": 4})
    assert both.spec(("batch", "length"), (8, 5)) == P(("data", "fsdp"), None)
    assert both.spec(("batch",), (2,)) == P("data")  # fsdp would not divide what is left
    with pytest.raises(ValueError, match="no rule"):
        part.spec(("mystery",))


def test_7b_params_spread_over_fsdp_8():
    cfg = preset("llama2_7b")
    part = Partitioner({"fsdp": 8})
    shapes = llama.param_shapes(cfg)
    shardings = part.shardings_for(llama.param_logical_axes(cfg), shapes)
    total = per_device = 0
    for shaped, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        nbytes = np.prod(shaped.shape) * shaped.dtype.itemsize
        total += nbytes
        per_device += np.prod(sharding.shard_shape(shaped.shape)) * shaped.dtype.itemsize
    assert total == cfg.num_params() * 4
    # Only the norm scales (0.004% of the bytes) stay replicated.
    assert per_device == pytest.approx(total / 8, rel=1e-3)


def _train_three_steps(mesh_shape):
    cfg = preset("tiny", scan_layers=True)
    part = Partitioner(mesh_shape)
    optimizer, schedule = train_state.OptimizerConfig(learning_rate=1e-3).build(3)
    setup = ShardedTraining.create("lm", cfg, part, optimizer)
    state = setup.init_state()
    step = setup.partition_step(make_train_step(sft.sft_loss_fn(cfg), optimizer, schedule))
    data = ReverseTask(8, 16).batches(0)
    for _ in range(3):
        state, metrics = step(state, part.shard_batch(next(data)))
    return state, metrics


def test_sharded_step_equals_single_device():
    single, single_metrics = _train_three_steps({"data": 1, "fsdp": 1, "tensor": 1})
    for mesh in ({"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}):
        sharded, metrics = _train_three_steps(mesh)
        spec = sharded.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec
        assert "fsdp" in str(spec)  # really sharded
        np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]),
                                   rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=1e-5),
                     sharded.params, single.params)
