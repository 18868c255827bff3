"""The params digest: the same for the same values wherever they live, different otherwise."""

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.checkpoints import digest
from xwin_jax.checkpoints.params import checkpoint_digest, save_params
from xwin_jax.models import llama
from xwin_jax.partitioning import Partitioner

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=2)


def test_host_device_and_sharded_arrays_give_one_digest():
    params = llama.init_params(CFG, jax.random.key(0))
    on_device = digest.params_digest(params)
    on_host = digest.params_digest(jax.tree.map(np.asarray, params))
    partitioner = Partitioner({"data": 1, "fsdp": 4, "tensor": 2})
    shardings = partitioner.shardings_for(llama.param_logical_axes(CFG),
                                          jax.eval_shape(lambda: params))
    sharded = digest.params_digest(jax.tree.map(jax.device_put, params, shardings))
    assert on_device == on_host == sharded
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert digest.params_digest(bf16) == digest.params_digest(jax.tree.map(np.asarray, bf16))
    assert digest.params_digest(bf16) != on_device


def test_any_changed_or_moved_value_changes_the_digest():
    params = jax.tree.map(np.asarray, llama.init_params(CFG, jax.random.key(0)))
    base = digest.params_digest(params)
    leaves, tree = jax.tree.flatten(params)
    for change in ("one element", "swap", "float64"):
        changed = [x.copy() for x in leaves]
        if change == "one element":
            changed[2].flat[7] = np.nextafter(changed[2].flat[7], np.float32(np.inf))
        elif change == "swap":  # the same values in another order
            changed[2].flat[[3, 4]] = changed[2].flat[[4, 3]]
        else:
            changed[2] = changed[2].astype(np.float64)
        assert digest.params_digest(jax.tree.unflatten(tree, changed)) != base, change


def test_a_checkpoint_records_its_digest_and_an_overwrite_replaces_it(tmp_path):
    params = llama.init_params(CFG, jax.random.key(0))
    save_params(str(tmp_path), CFG, params)
    first = checkpoint_digest(str(tmp_path))
    assert first == digest.params_digest(params)
    save_params(str(tmp_path), CFG, jax.tree.map(lambda x: x * 2, params))
    assert checkpoint_digest(str(tmp_path)) != first
    # Checkpoints from before digests existed are hashed file by file: other values, other
    # digest; the same directory, the same one.
    save_params(str(tmp_path / "old"), CFG, params)
    for directory in (tmp_path, tmp_path / "old"):
        (directory / "params_digest.json").unlink()
    old = checkpoint_digest(str(tmp_path / "old"))
    assert old not in (first, checkpoint_digest(str(tmp_path)))
    assert checkpoint_digest(str(tmp_path / "old")) == old
