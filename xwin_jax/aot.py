"""Ahead-of-time plans: what a training step needs on each device, with nothing allocated.

    partitioner = Partitioner({"data": 1, "fsdp": 8, "tensor": 1})
    plan = plan_step("sft", preset("llama2_7b", remat_policy="full"), partitioner,
                     batch=8, seq_len=2048, logits_chunk=512)
    print(format_plan(plan, device_memory_gib=80))

Each step is built by the code the jobs run (ShardedTraining, the stage's loss and
make_train_step, ppo.make_update_step, the rollout scoring functions, sampling's generator),
lowered on ShapeDtypeStructs that carry the partitioner's shardings, and compiled; XLA's
`memory_analysis()` gives the per-device arguments, temporaries and outputs, and
`cost_analysis()` its FLOP count. Compiling for fake CPU devices
(`--xla_force_host_platform_device_count`) is a proxy for the accelerator: the sharded
arguments are exact, the temporaries depend on the backend's fusion and layouts.

PPO holds four models on the mesh during an iteration: policy and value with their AdamW
states, the frozen reference and reward models. Its plan compiles the three phases of an
iteration — rollout (generation with a KV cache), scoring (four forward passes), update (one
policy and one value step on a minibatch) — and adds to each phase's compiled peak the bytes
of the resident state that phase does not take as arguments; the iteration's peak is the
largest phase.

Gin-free: bench/aot_memory.py is the command line.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from xwin_jax.checkpoints.manager import abstract_like
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, SCORE, spec
from xwin_jax.partitioning import Partitioner
from xwin_jax.rewards import raw_scores
from xwin_jax.decoding import DecodeLayout
from xwin_jax.train import ppo, reward, sft
from xwin_jax.train import state as train_state
from xwin_jax.train.sharded import ShardedTraining
from xwin_jax.train.step import make_train_step

STEPS = ("sft", "reward", "ppo")
GIB = 2 ** 30


# --- sizes ------------------------------------------------------------------------------------

def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs/arrays with NamedShardings (the
    largest shard: shardings here split evenly or not at all)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's per-device buffer sizes; peak = arguments + temporaries + outputs - aliased
    (donated arguments reused as outputs)."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes)}
    out["peak"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count for one device's program. A while loop (scanned layers, logits
    chunks, the decode loop) is counted once, not once per iteration."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _compile(partitioned, *args, **kwargs) -> tuple[Any, float]:
    began = time.perf_counter()
    compiled = partitioned.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - began


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


# --- FLOP models (6 x matmul params per trained token, 2 x per forward token) ----------------

def _head_params(cfg: LlamaConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


def _trunk_matmul_params(cfg: LlamaConfig) -> int:
    """Matmul params of the decoder stack (no embedding gather, no LM head)."""
    embed = cfg.vocab_size * cfg.hidden_size
    return cfg.num_params() - embed - (0 if cfg.tie_word_embeddings else embed)


def _forward_flops(cfg: LlamaConfig, rows: int, seq_len: int, head_positions: int) -> float:
    """Forward FLOPs of `rows` sequences of seq_len tokens with the LM head on head_positions
    of them (0 for a scalar-head model); causal attention 2 x layers x seq x hidden/token."""
    tokens = rows * seq_len
    return (2.0 * _trunk_matmul_params(cfg) * tokens
            + 2.0 * cfg.num_layers * seq_len * cfg.hidden_size * tokens
            + 2.0 * _head_params(cfg) * rows * head_positions)


# --- the steps --------------------------------------------------------------------------------

def _optimizer():
    return train_state.OptimizerConfig(learning_rate=1e-5).build(1000)


def _state_bytes(setup: ShardedTraining) -> dict[str, int]:
    state = setup.abstract_state
    return {"params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state) + per_device_bytes(state.step)}


def _describe(step: str, cfg: LlamaConfig, partitioner: Partitioner, batch: int,
              seq_len: int) -> dict[str, Any]:
    return {"step": step, "num_params": cfg.num_params(), "mesh": dict(partitioner.sizes),
            "devices": int(partitioner.mesh.size), "batch": batch, "seq_len": seq_len,
            "remat": cfg.remat_policy, "param_dtype": cfg.param_dtype, "dtype": cfg.dtype,
            "scan_layers": cfg.scan_layers, "num_layers": cfg.num_layers}


def _phase(compiled, seconds: float, flops_model: float, devices: int,
           resident_outside: int = 0) -> dict[str, Any]:
    memory = compiled_memory(compiled)
    return {"memory": memory, "resident_outside": resident_outside,
            "peak": memory["peak"] + resident_outside,
            "flops_model": flops_model / devices, "flops_xla": compiled_flops(compiled),
            "compile_s": round(seconds, 2)}


def plan_sft(cfg: LlamaConfig, partitioner: Partitioner, batch: int, seq_len: int, *,
             logits_chunk: int | None = None, num_micro_batches: int = 1,
             packed: bool = True) -> dict[str, Any]:
    """The SFT train step (train/sft.py) on [batch, seq_len] rows; packed rows carry
    segment_ids and positions, as the SFT data feeds them (which also decides the attention
    kernel: on GPU, cuDNN flash attention only takes unpacked rows)."""
    optimizer, schedule = _optimizer()
    setup = ShardedTraining.create(LM, cfg, partitioner, optimizer)
    step = setup.partition_step(make_train_step(
        sft.sft_loss_fn(cfg, chunk_size=logits_chunk), optimizer, schedule, num_micro_batches,
        compute_params=setup.compute_params))
    rows = partitioner.data_sharding(2)
    data = {"input_tokens": _abstract((batch, seq_len), jnp.int32, rows),
            "target_tokens": _abstract((batch, seq_len), jnp.int32, rows),
            "loss_weights": _abstract((batch, seq_len), jnp.float32, rows)}
    if packed:
        data.update(segment_ids=_abstract((batch, seq_len), jnp.int32, rows),
                    positions=_abstract((batch, seq_len), jnp.int32, rows))
    compiled, seconds = _compile(step, setup.abstract_state, data)
    plan = _describe("sft", cfg, partitioner, batch, seq_len)
    plan.update(logits_chunk=logits_chunk, num_micro_batches=num_micro_batches, packed=packed,
                state=_state_bytes(setup))
    plan.update(_phase(compiled, seconds, cfg.train_flops_per_token(seq_len) * batch * seq_len,
                       partitioner.mesh.size))
    return plan


def plan_reward(cfg: LlamaConfig, partitioner: Partitioner, batch: int, seq_len: int
                ) -> dict[str, Any]:
    """The reward-model train step (train/reward.py) on `batch` pairs: the chosen and the
    rejected rows of seq_len tokens go through the model in one pass (2 x batch rows)."""
    optimizer, schedule = _optimizer()
    setup = ShardedTraining.create(SCORE, cfg, partitioner, optimizer)
    step = setup.partition_step(make_train_step(
        reward.reward_loss_fn(cfg), optimizer, schedule,
        input_tokens=reward.pair_input_tokens, compute_params=setup.compute_params))
    rows, per_row = partitioner.data_sharding(2), partitioner.data_sharding(1)
    data = {}
    for side in ("chosen", "rejected"):
        data[f"{side}_tokens"] = _abstract((batch, seq_len), jnp.int32, rows)
        data[f"{side}_length"] = _abstract((batch,), jnp.int32, per_row)
        data[f"{side}_rating"] = _abstract((batch,), jnp.float32, per_row)
    compiled, seconds = _compile(step, setup.abstract_state, data)
    plan = _describe("reward", cfg, partitioner, batch, seq_len)
    plan.update(pairs=batch, state=_state_bytes(setup))
    # 6 x trunk params per token (no LM head) + attention, over 2 x batch rows.
    flops = 3.0 * _forward_flops(cfg, 2 * batch, seq_len, head_positions=0)
    plan.update(_phase(compiled, seconds, flops, partitioner.mesh.size))
    return plan


def plan_ppo(cfg: LlamaConfig, partitioner: Partitioner, batch: int, prompt_len: int,
             new_tokens: int, *, num_minibatches: int = 4, reward_cfg: LlamaConfig | None = None,
             phases: tuple[str, ...] = ("rollout", "scoring", "update"),
             decode_layout: DecodeLayout | None = None) -> dict[str, Any]:
    """One PPO iteration (train/ppo.py's PPOPhases: the job's own programs) with a rollout
    batch of `batch` prompts of prompt_len tokens and new_tokens sampled per prompt, the
    rollout in `decode_layout` (decoding.py). Policy and reference share `cfg`; value and
    reward models use reward_cfg (default: cfg's shapes with a scalar head)."""
    reward_cfg = reward_cfg or cfg
    seq_len = prompt_len + new_tokens
    minibatch = batch // num_minibatches
    if batch % num_minibatches or minibatch % partitioner.batch_divisor:
        raise ValueError(f"batch={batch} must split into num_minibatches={num_minibatches} "
                         f"minibatches that divide over {partitioner.batch_divisor} data shards")
    ppo_cfg = ppo.PPOConfig(max_new_tokens=new_tokens, num_minibatches=num_minibatches)
    policy_opt, value_opt = _optimizer(), _optimizer()  # (optimizer, schedule) pairs
    policy = ShardedTraining.create(LM, cfg, partitioner, policy_opt[0])
    value = ShardedTraining.create(SCORE, reward_cfg, partitioner, value_opt[0])
    # The frozen models: the reference in the policy's shardings, the RM in its own.
    reference_params = policy.abstract_state.params
    rm_shardings = spec(SCORE).shardings(reward_cfg, partitioner)
    rm_params = abstract_like(spec(SCORE).shapes(reward_cfg), rm_shardings)
    models = {
        "policy": _state_bytes(policy), "value": _state_bytes(value),
        "reference": {"params": per_device_bytes(reference_params), "opt_state": 0},
        "reward": {"params": per_device_bytes(rm_params), "opt_state": 0}}
    resident = sum(m["params"] + m["opt_state"] for m in models.values())
    devices = partitioner.mesh.size
    rows = partitioner.data_sharding(2)
    plan = _describe("ppo", cfg, partitioner, batch, seq_len)
    plan.update(prompt_len=prompt_len, new_tokens=new_tokens, minibatch=minibatch,
                num_minibatches=num_minibatches, models=models, resident=resident,
                phases={})

    # The job's own three programs (ppo.PPOPhases), the rollout in the decode layout.
    programs = ppo.PPOPhases.create(
        cfg, reward_cfg, ppo_cfg, partitioner, policy, value, rm_shardings,
        policy_optimizer=policy_opt, value_optimizer=value_opt,
        scores_of=lambda p, t, m: raw_scores(reward_cfg, p, t, m), minibatch=minibatch,
        stop_ids=(2,), pad_id=0, decode_layout=decode_layout)
    scalar = partitioner.replicated
    iteration = _abstract((), jnp.int32, scalar)
    response = {"response_mask": jnp.int32, "sampler_logprobs": jnp.float32}
    rollout_rows = {**{name: _abstract((batch, seq_len), jnp.int32, rows)
                       for name in ("tokens", "mask")},
                    **{name: _abstract((batch, new_tokens), dtype, rows)
                       for name, dtype in response.items()},
                    "finished": _abstract((batch,), jnp.bool_, partitioner.batch_sharding),
                    "temperature": _abstract((batch,), jnp.float32,
                                             partitioner.batch_sharding)}

    if "update" in phases:
        update_batch = {name: rollout_rows[name] for name in ("tokens", "mask", "temperature")}
        update_batch.update({name: _abstract((batch, new_tokens), dtype, rows)
                             for name, dtype in (("response_mask", jnp.int32),
                                                 ("old_logp", jnp.float32),
                                                 ("old_values", jnp.float32),
                                                 ("advantages", jnp.float32),
                                                 ("returns", jnp.float32))})
        order = _abstract((ppo_cfg.epochs * batch,), jnp.int32, scalar)
        compiled, seconds = _compile(programs.update, policy.abstract_state,
                                     value.abstract_state, update_batch, order, iteration)
        flops = 3.0 * (_forward_flops(cfg, minibatch, seq_len, new_tokens)
                       + _forward_flops(reward_cfg, minibatch, seq_len, 0))
        plan["phases"]["update"] = _phase(
            compiled, seconds, flops, devices,
            resident_outside=models["reference"]["params"] + models["reward"]["params"])

    if "scoring" in phases:
        compiled, seconds = _compile(
            programs.scoring, policy.abstract_state.params, reference_params,
            value.abstract_state.params, rm_params, rollout_rows,
            _abstract((), jnp.float32, scalar), iteration)
        flops = (2 * _forward_flops(cfg, batch, seq_len, new_tokens)
                 + 2 * _forward_flops(reward_cfg, batch, seq_len, 0))
        plan["phases"]["scoring"] = _phase(
            compiled, seconds, flops, devices,
            resident_outside=models["policy"]["opt_state"] + models["value"]["opt_state"])

    if "rollout" in phases:
        decode = programs.decoder.partitioner
        prompts = {name: _abstract((batch, prompt_len), jnp.int32, decode.data_sharding(2))
                   for name in ("tokens", "mask")}
        settings = jax.tree.map(lambda x: _abstract(x.shape, x.dtype, decode.replicated),
                                programs.settings)
        weights = programs.decoder.abstract_weights()
        compiled, seconds = _compile(programs.rollout, weights, prompts,
                                     _abstract((), jnp.int32, decode.replicated), settings)
        plan["decode_weights"] = per_device_bytes(weights)
        # Prefill of the prompt, then one token at a time against the whole cache.
        flops = (2.0 * _trunk_matmul_params(cfg) * batch * seq_len
                 + 2.0 * cfg.num_layers * prompt_len * cfg.hidden_size * batch * prompt_len
                 + 4.0 * cfg.num_layers * seq_len * cfg.hidden_size * batch * new_tokens
                 + 2.0 * _head_params(cfg) * batch * new_tokens)
        # The decode copy is the program's argument; every training-layout model stays.
        plan["phases"]["rollout"] = _phase(compiled, seconds, flops, devices,
                                           resident_outside=resident)

    if not plan["phases"]:
        raise ValueError(f"phases={tuple(phases)}: plan at least one of "
                         f"'rollout', 'scoring', 'update'")
    peak_phase = max(plan["phases"], key=lambda name: plan["phases"][name]["peak"])
    plan.update(peak=plan["phases"][peak_phase]["peak"], peak_phase=peak_phase,
                memory=plan["phases"][peak_phase]["memory"],
                resident_outside=plan["phases"][peak_phase]["resident_outside"],
                # One iteration: a rollout, a scoring pass, epochs x minibatches updates.
                flops_model=sum(p["flops_model"] * (ppo_cfg.epochs * num_minibatches
                                                    if name == "update" else 1)
                                for name, p in plan["phases"].items()),
                epochs=ppo_cfg.epochs,
                flops_xla=None,
                compile_s=round(sum(p["compile_s"] for p in plan["phases"].values()), 2),
                state={"params": sum(m["params"] for m in models.values()),
                       "opt_state": sum(m["opt_state"] for m in models.values())})
    return plan


def plan_step(step: str, cfg: LlamaConfig, partitioner: Partitioner, *, batch: int,
              seq_len: int | None = None, prompt_len: int | None = None,
              new_tokens: int | None = None, logits_chunk: int | None = None,
              num_micro_batches: int = 1, num_minibatches: int = 4,
              reward_cfg: LlamaConfig | None = None, packed: bool = True,
              count_flops: bool = False,
              phases: tuple[str, ...] = ("rollout", "scoring", "update"),
              decode_layout: DecodeLayout | None = None) -> dict[str, Any]:
    """The plan of one step: 'sft', 'reward' (batch = pairs) or 'ppo' (batch = prompts per
    rollout; prompt_len + new_tokens, or seq_len split in half). Sizes in the dict are bytes
    per device; flops_model is the 6N-per-token estimate (2N for forward-only phases) per
    device, flops_xla XLA's count of the compiled program, in which every loop (scanned
    layers, logits chunks, micro-batches, decoding) counts once.

    count_flops adds flops_xla_unrolled: XLA's count for the whole model, from two more
    compiles with 1 and 2 unscanned layers, no logits chunks and no micro-batches (FLOPs are
    affine in the layer count): count(1) + (layers - 1) x (count(2) - count(1)). For PPO the
    rollout's decode loop still counts once, so only scoring and update get it."""
    if batch % partitioner.batch_divisor:
        raise ValueError(f"batch={batch} does not divide over data x fsdp = "
                         f"{partitioner.batch_divisor} shards of {partitioner.sizes}")
    if step == "ppo":
        if prompt_len is None and new_tokens is None:
            prompt_len = _need(seq_len, "seq_len or prompt_len + new_tokens") // 2
        if prompt_len is None:
            prompt_len = _need(seq_len, "seq_len or prompt_len") - new_tokens
        if new_tokens is None:
            new_tokens = _need(seq_len, "seq_len or new_tokens") - prompt_len
        if prompt_len < 1 or new_tokens < 1:
            raise ValueError(f"PPO needs prompt_len >= 1 and new_tokens >= 1 (got {prompt_len}, "
                             f"{new_tokens})")

    def plan_for(cfg, reward_cfg, logits_chunk, num_micro_batches, phases):
        if step == "sft":
            return plan_sft(cfg, partitioner, batch, _need(seq_len, "seq_len"),
                            logits_chunk=logits_chunk, num_micro_batches=num_micro_batches,
                            packed=packed)
        if step == "reward":
            return plan_reward(cfg, partitioner, batch, _need(seq_len, "seq_len"))
        if step == "ppo":
            return plan_ppo(cfg, partitioner, batch, prompt_len, new_tokens,
                            num_minibatches=num_minibatches, reward_cfg=reward_cfg,
                            phases=phases, decode_layout=decode_layout)
        raise ValueError(f"step={step!r}: choose one of {STEPS}")

    plan = plan_for(cfg, reward_cfg, logits_chunk, num_micro_batches, phases)
    counted = [p for p in phases if p != "rollout"] if step == "ppo" else list(phases)
    if count_flops and counted:  # a rollout-only PPO plan has nothing to count
        small = [plan_for(cfg.replace(scan_layers=False, num_layers=n),
                          (reward_cfg or cfg).replace(scan_layers=False, num_layers=n),
                          None, 1, tuple(counted)) for n in (1, 2)]

        def unrolled(one, two):
            return one + (cfg.num_layers - 1) * (two - one)

        if step == "ppo":
            for name in counted:
                plan["phases"][name]["flops_xla_unrolled"] = unrolled(
                    *(s["phases"][name]["flops_xla"] for s in small))
        else:
            plan["flops_xla_unrolled"] = unrolled(*(s["flops_xla"] for s in small))
    return plan


def _need(value, name):
    if value is None:
        raise ValueError(f"{name} is required for this step")
    return value


# --- reporting --------------------------------------------------------------------------------

def fits(plan: dict, device_memory_gib: float) -> bool:
    return plan["peak"] <= device_memory_gib * GIB


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _flops(n: float | None) -> str:
    return "n/a" if n is None else f"{n:.3g}"


def _xla(counts: dict) -> str:
    if counts.get("flops_xla_unrolled") is not None:
        return f"XLA {_flops(counts['flops_xla_unrolled'])}"
    return f"XLA {_flops(counts['flops_xla'])} (loops once)"


def format_phase(name: str, phase: dict) -> str:
    m = phase["memory"]
    extra = (f" + resident {_gib(phase['resident_outside'])}" if phase["resident_outside"]
             else "")
    return (f"  {name:<8} args {_gib(m['arguments'])} temp {_gib(m['temporaries'])} "
            f"out {_gib(m['outputs'])} (aliased {_gib(m['aliased'])}){extra} "
            f"→ peak {_gib(phase['peak'])} GiB | FLOP/device model {_flops(phase['flops_model'])}"
            f" {_xla(phase)} | compiled in {phase['compile_s']:.0f} s")


def format_plan(plan: dict, device_memory_gib: float = 80.0, name: str = "") -> str:
    """One line per step (plus a line per phase for PPO)."""
    mesh = " x ".join(f"{k} {v}" for k, v in plan["mesh"].items() if v > 1) or "1 device"
    shape = (f"{plan['batch']} x ({plan['prompt_len']}+{plan['new_tokens']})"
             if plan["step"] == "ppo" else f"{plan['batch']} x {plan['seq_len']}")
    m = plan["memory"]
    state = plan["state"]
    head = (f"{plan['step']:<6} {name} {plan['num_params'] / 1e9:.2f}B | {mesh} | "
            f"remat {plan['remat']} | params {plan['param_dtype']} compute {plan['dtype']} | "
            f"{shape} |")
    if plan["step"] == "ppo":
        models = plan["models"]
        body = (f" 4 models resident {_gib(plan['resident'])} (policy "
                f"{_gib(models['policy']['params'])}+opt {_gib(models['policy']['opt_state'])},"
                f" value {_gib(models['value']['params'])}+opt "
                f"{_gib(models['value']['opt_state'])}, ref {_gib(models['reference']['params'])},"
                f" RM {_gib(models['reward']['params'])})"
                + (f", decode copy {_gib(plan['decode_weights'])}" if "decode_weights" in plan
                   else "")
                + f" | largest phase {plan['peak_phase']}: temp {_gib(m['temporaries'])} |")
    else:
        body = (f" args {_gib(m['arguments'])} (params {_gib(state['params'])} + opt "
                f"{_gib(state['opt_state'])}) temp {_gib(m['temporaries'])} out "
                f"{_gib(m['outputs'])} (aliased {_gib(m['aliased'])}) |")
    flops = (f" FLOP/device model {_flops(plan['flops_model'])} {_xla(plan)} |"
             if plan["step"] != "ppo" else
             f" FLOP/device/iteration model {_flops(plan['flops_model'])} |")
    verdict = "yes" if fits(plan, device_memory_gib) else "NO"
    line = (f"{head}{body} peak {_gib(plan['peak'])} GiB |{flops} fits on "
            f"{device_memory_gib:g} GiB: {verdict} | compiled in {plan['compile_s']:.0f} s")
    if plan["step"] == "ppo":
        line += "\n" + "\n".join(format_phase(n, p) for n, p in plan["phases"].items())
    return line
