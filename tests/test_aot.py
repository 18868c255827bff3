"""xwin_jax.aot: per-device memory plans of the training steps, compiled on abstract arrays."""

import jax
import pytest

from xwin_jax import aot
from xwin_jax.models.config import preset
from xwin_jax.models.llama import init_params
from xwin_jax.partitioning import Partitioner

CFG = preset("tiny", remat_policy="full")


def param_bytes(cfg):
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_sft_arguments_shard_eight_ways():
    one = aot.plan_step("sft", CFG, Partitioner({"fsdp": 1}), batch=8, seq_len=64,
                        logits_chunk=32)
    eight = aot.plan_step("sft", CFG, Partitioner({"fsdp": 8}), batch=8, seq_len=64,
                          logits_chunk=32)
    # fp32 params + two AdamW moments: 12 bytes a parameter on one device.
    full = param_bytes(CFG)
    assert one["state"]["params"] == full
    assert one["state"]["opt_state"] == pytest.approx(2 * full, rel=0.01)
    assert one["memory"]["arguments"] == pytest.approx(3 * full, rel=0.05)
    # Sharded over fsdp=8: an eighth, up to the replicated norm scales and the batch.
    ratio = eight["memory"]["arguments"] / one["memory"]["arguments"]
    assert 1 / 8 <= ratio < 1.15 / 8
    assert eight["devices"] == 8 and eight["mesh"]["fsdp"] == 8
    for plan in (one, eight):
        m = plan["memory"]
        assert m["aliased"] > 0                       # the state is donated
        assert plan["flops_xla"] > 0
    # The model estimate divides over the devices; the per-device XLA counts agree with it to
    # within remat's recomputed forward pass and the small ops the 6N estimate ignores.
    assert eight["flops_model"] == pytest.approx(one["flops_model"] / 8)
    assert 1.0 < one["flops_xla"] / one["flops_model"] < 2.0
    assert aot.fits(one, 1.0) and not aot.fits(one, 1e-6)
    line = aot.format_plan(eight, 80, "tiny")
    assert line.startswith("sft") and "fsdp 8" in line and "fits on 80 GiB: yes" in line


def test_ppo_plan_counts_four_models():
    partitioner = Partitioner({"fsdp": 8})
    plan = aot.plan_ppo(CFG, partitioner, batch=16, prompt_len=16, new_tokens=16,
                        num_minibatches=2, phases=("update",))
    models = plan["models"]
    assert set(models) == {"policy", "value", "reference", "reward"}
    per_device = param_bytes(CFG) / 8
    # Policy and reference are LMs; value and reward models swap the LM head for a scalar one.
    assert models["reference"]["params"] == models["policy"]["params"]
    assert models["reward"]["params"] == models["value"]["params"]
    assert models["policy"]["params"] == pytest.approx(per_device, rel=0.15)
    assert models["value"]["params"] < models["policy"]["params"]
    assert models["reference"]["opt_state"] == models["reward"]["opt_state"] == 0
    assert models["policy"]["opt_state"] == pytest.approx(2 * models["policy"]["params"],
                                                          rel=0.02)
    # Resident: 4 models' fp32 params plus 2 AdamW moments of the two trained ones, about
    # 8 x an LM's bytes per device (the scalar head models are a little smaller).
    lm, head = param_bytes(CFG), param_bytes(CFG) - CFG.vocab_size * CFG.hidden_size * 4
    assert plan["resident"] == pytest.approx((3 * lm + 3 * head + lm + head) / 8, rel=0.05)
    # The update compiles policy + value states; the frozen models are added on top.
    update = plan["phases"]["update"]
    assert update["resident_outside"] == models["reference"]["params"] + models["reward"][
        "params"]
    assert update["memory"]["arguments"] >= 3 * (models["policy"]["params"]
                                                 + models["value"]["params"])
    assert plan["peak"] == update["peak"] and plan["peak_phase"] == "update"
    assert "4 models resident" in aot.format_plan(plan)


def test_ppo_needs_minibatches_that_shard():
    with pytest.raises(ValueError, match="minibatches"):
        aot.plan_step("ppo", CFG, Partitioner({"fsdp": 8}), batch=8, seq_len=32)


def test_reward_and_every_ppo_phase_plan_with_whole_model_flops():
    partitioner = Partitioner({"fsdp": 2})
    rm = aot.plan_step("reward", CFG, partitioner, batch=8, seq_len=64)
    sft = aot.plan_step("sft", CFG, partitioner, batch=16, seq_len=64)
    # Chosen + rejected rows in one pass: the FLOPs of an SFT step on twice the rows, less
    # the LM head (a scalar head instead); the state is donated.
    assert 0.5 < rm["flops_model"] / sft["flops_model"] < 1.0
    assert rm["memory"]["aliased"] > 0 and rm["state"]["opt_state"] > rm["state"]["params"]
    ppo = aot.plan_step("ppo", CFG, partitioner, batch=8, seq_len=64, num_minibatches=2,
                        count_flops=True)
    phases = ppo["phases"]
    assert set(phases) == {"rollout", "scoring", "update"}
    assert ppo["peak"] == max(p["peak"] for p in phases.values())
    assert ppo["peak_phase"] == max(phases, key=lambda name: phases[name]["peak"])
    assert "flops_xla_unrolled" in phases["scoring"] and "flops_xla_unrolled" in phases["update"]
    assert "flops_xla_unrolled" not in phases["rollout"]  # its decode loop counts once
    # Scoring: four models' forward passes over the B rollout rows (4FB). An update: policy
    # and value, forward + backward (3x, 4x with full remat) over B/2 rows (3-4 FB).
    ratio = phases["update"]["flops_xla_unrolled"] / phases["scoring"]["flops_xla_unrolled"]
    assert 0.5 < ratio < 2.0
    with pytest.raises(ValueError, match="plan at least one of"):
        aot.plan_step("ppo", CFG, partitioner, batch=8, seq_len=64, phases=())
