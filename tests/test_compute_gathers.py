"""FSDP gathers in the compute dtype: ShardedTraining.compute_params casts the fp32 master
weights to bf16 on their shards, once per step, and the gradients flow back to the masters.

What the gathers are is read from the module right after SPMD partitioning
(bench/fsdp_gathers.partitioned_hlo): XLA:CPU's final HLO (`compiled.as_text()`) widens every
bf16 collective to f32 (it has none), so it shows f32 whatever the program asks for.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xwin_jax.data.toy import ReverseTask
from xwin_jax.models import llama
from xwin_jax.models.config import LlamaConfig
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import sft
from xwin_jax.train import state as train_state
from xwin_jax.train.sharded import ShardedTraining
from xwin_jax.train.step import make_train_step

from xwin_jax.hlo import collective_bytes, partitioned_hlo

# Small enough to compile quickly for 8 devices; every weight's embed axis shards 8 ways.
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_seq_len=64, scan_layers=False,
                  dtype="bfloat16", param_dtype="float32")
STEPS = 4
GATHER = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\]\S* all-gather(?:-start)?\(")


def _batches():
    data = ReverseTask(8, 16, vocab_size=CFG.vocab_size).batches(0)
    return [next(data) for _ in range(STEPS)]


def _setup(cfg, mesh):
    optimizer, schedule = train_state.OptimizerConfig(learning_rate=1e-3).build(STEPS)
    return ShardedTraining.create("lm", cfg, Partitioner(mesh), optimizer), optimizer, schedule


@pytest.fixture(scope="module")
def fsdp8_runs():
    """Both variants of the bf16-compute SFT step on fsdp=8, each compiled once (with the
    partitioned module dumped) and run STEPS steps from the same init."""
    setup, optimizer, schedule = _setup(CFG, {"fsdp": 8})
    partitioner = setup.partitioner
    init = jax.device_get(setup.init_state())
    batches = [partitioner.shard_batch(b) for b in _batches()]
    runs = {}
    for name, compute in (("master", None), ("compute", setup.compute_params)):
        step = setup.partition_step(make_train_step(sft.sft_loss_fn(CFG), optimizer, schedule,
                                                    compute_params=compute))
        state = jax.device_put(init, setup.shardings)
        partitioned, compiled = partitioned_hlo(step.lower(state, batches[0]))
        losses = []
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
        runs[name] = {"partitioned": partitioned, "final": compiled.as_text(), "losses": losses,
                      "params": jax.device_get(state.params)}
    return runs


def _gathers(hlo):
    """(dtype, shape) of every all-gather in an HLO text."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in GATHER.findall(hlo)]


def test_weight_gathers_are_bf16_with_compute_params(fsdp8_runs):
    gathers = _gathers(fsdp8_runs["compute"]["partitioned"])
    weights = [(dtype, shape) for dtype, shape in gathers if len(shape) == 2]
    assert len(weights) >= 7 * CFG.num_layers  # q k v o gate up down of every layer
    lm_head = (CFG.hidden_size, CFG.vocab_size)
    # Every weight is gathered in bf16, except the LM head kernel once, in f32: its backward
    # multiplies the fp32 logits' cotangent by it (sft's logits are fp32), which promotes it.
    assert sorted(s for d, s in weights if d == "f32") == [lm_head]
    assert {d for d, _ in weights} == {"bf16", "f32"}
    counted = collective_bytes(fsdp8_runs["compute"]["partitioned"])["all-gather"]
    assert counted["f32"] == 4 * CFG.hidden_size * CFG.vocab_size
    assert counted["bf16"] == 2 * sum(np.prod(s) for d, s in weights if d == "bf16")


def test_cpu_final_hlo_widens_every_gather_to_f32(fsdp8_runs):
    """The control that shows the check above can fail: the same compile's final CPU HLO
    gathers every weight in f32, and the parser sees it (and no bf16 at all)."""
    final = fsdp8_runs["compute"]["final"]
    weights = [(d, s) for d, s in _gathers(final) if len(s) == 2]
    assert weights and {d for d, _ in weights} == {"f32"}
    assert "bf16" not in collective_bytes(final)["all-gather"]


def test_compute_params_train_like_the_master_weights(fsdp8_runs):
    """The cast on the shard gives the weights the layers' own cast gave: measured bitwise
    equal losses and params after 4 AdamW steps; the tolerance is 1e-6 (rtol, losses) and
    1e-6 (atol, params). Casting the token embedding too (its gradient then a bf16
    scatter-add) moved the losses by up to 7e-5 relative and params by 1e-3: this catches it."""
    master, compute = fsdp8_runs["master"], fsdp8_runs["compute"]
    assert master["losses"][-1] < master["losses"][0]  # it trains
    np.testing.assert_allclose(compute["losses"], master["losses"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 compute["params"], master["params"])
    # The master weights stay fp32.
    assert {x.dtype for x in jax.tree.leaves(compute["params"])} == {jnp.dtype("float32")}


def test_fp32_compute_is_the_same_program():
    """With fp32 compute the cast is a no-op: the two steps trace to the same jaxpr."""
    cfg = CFG.replace(dtype="float32")
    setup, optimizer, schedule = _setup(cfg, {"fsdp": 2})
    batch = setup.partitioner.shard_batch(_batches()[0])
    jaxprs = [str(jax.make_jaxpr(make_train_step(sft.sft_loss_fn(cfg), optimizer, schedule,
                                                 compute_params=compute))(
        setup.abstract_state, batch)) for compute in (None, setup.compute_params)]
    assert jaxprs[0] == jaxprs[1]


def test_micro_batches_accumulate_master_gradients():
    """With compute_params and 4 micro-batches, each micro-batch's bf16 gradient is pulled
    back to the fp32 params before it is added, as the layers' own cast did: the same step as
    without compute_params (plain SGD, rate 1, so the parameter change is the summed
    gradient; measured bitwise equal, checked to 1e-6), and the state keeps its dtypes."""
    import optax

    setup, _, _ = _setup(CFG, {"fsdp": 1})
    schedule = optax.constant_schedule(1.0)
    optimizer = optax.sgd(schedule)
    params = llama.init_params(CFG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batches()[0].items()}
    out = {}
    for name, compute in (("master", None), ("compute", setup.compute_params)):
        state = train_state.init_state(params, optimizer)
        step = jax.jit(make_train_step(sft.sft_loss_fn(CFG), optimizer, schedule, 4,
                                       compute_params=compute))
        out[name] = step(state, batch)
    (master, master_metrics), (compute, compute_metrics) = out["master"], out["compute"]
    np.testing.assert_allclose(float(compute_metrics["loss"]), float(master_metrics["loss"]),
                               rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 compute.params, master.params)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(compute.params), jax.tree.leaves(params)))
    assert moved > 0.1  # the step did something the comparison can see
    assert [x.dtype for x in jax.tree.leaves(compute)] == \
        [x.dtype for x in jax.tree.leaves(master)]
    assert {x.dtype for x in jax.tree.leaves(compute.params)} == {jnp.dtype("float32")}
