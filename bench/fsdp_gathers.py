"""FSDP collectives by dtype in the compiled SFT, reward-model and DPO train steps, with the
weights the loss reads cast to the compute dtype on their shards (ShardedTraining.
compute_params) and without (before: the fp32 master weights, cast inside each layer).

    python bench/fsdp_gathers.py                       # Llama-2-7B shapes, 2 layers, fsdp=8
    python bench/fsdp_gathers.py --preset tiny --batch 8 --seq 64 --logits_chunk 32

Compiles only (nothing is allocated or run) for --devices simulated CPU devices, with the
stages' own pieces (ShardedTraining, the stage's loss, make_train_step, partition_step; the
DPO reference pass is dpo.pair_logprobs under partition_eval), and counts the bytes of every
all-gather, reduce-scatter and all-reduce by dtype (xwin_jax/hlo.py: collective_bytes) in two
texts of the same compile:

  partitioned: the module right after SPMD partitioning, before any backend pass — the
               collectives the partitioner asks for, which a GPU or TPU runs as they are
               (XLA:GPU then turns all-reduce + dynamic-slice pairs into reduce-scatters);
  cpu final:   compiled.as_text(). XLA:CPU has no bf16 collectives: its float normalization
               and all-reduce promotion widen every bf16 all-gather / all-reduce to f32, so
               this text shows f32 either way and is not what an accelerator moves.

Layers are unscanned by default (--scan_layers keeps the preset's scan) so that every layer's
collectives appear once in the text; a while body (logits chunks, micro-batches) counts once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KINDS = ("sft", "reward", "dpo", "dpo_reference")
OPS = ("all-gather", "reduce-scatter", "all-reduce")
GIB = 2 ** 30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama2_7b")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or fsdp=4,tensor=2")
    parser.add_argument("--steps", default=",".join(KINDS), help=f"from {KINDS}")
    parser.add_argument("--batch", type=int, default=8, help="rows (SFT) or pairs (RM, DPO)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--logits_chunk", type=int, default=512, help="SFT; 0 = whole sequence")
    parser.add_argument("--scan_layers", action="store_true",
                        help="keep the layers in a scan (its body then counts once)")
    return parser.parse_args(argv)


def _abstract(shape, dtype, sharding):
    import jax
    import jax.numpy as jnp
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def lowered_steps(kind: str, cfg, partitioner, batch: int, seq_len: int,
                  logits_chunk: int | None):
    """{"before": Lowered, "after": Lowered} of one step kind (after = compute_params)."""
    import jax.numpy as jnp

    from xwin_jax.models.spec import LM, SCORE
    from xwin_jax.train import dpo, reward, sft
    from xwin_jax.train import state as train_state
    from xwin_jax.train.sharded import ShardedTraining
    from xwin_jax.train.step import make_train_step

    optimizer, schedule = train_state.OptimizerConfig(learning_rate=1e-5).build(1000)
    setup = ShardedTraining.create(SCORE if kind == "reward" else LM, cfg, partitioner,
                                   optimizer)
    rows, per_row = partitioner.data_sharding(2), partitioner.data_sharding(1)
    tokens = lambda: _abstract((batch, seq_len), jnp.int32, rows)  # noqa: E731
    variants = {"before": None, "after": setup.compute_params}
    if kind == "sft":
        data = {"input_tokens": tokens(), "target_tokens": tokens(),
                "loss_weights": _abstract((batch, seq_len), jnp.float32, rows),
                "segment_ids": tokens(), "positions": tokens()}
        loss_fn, count = sft.sft_loss_fn(cfg, chunk_size=logits_chunk), None
    elif kind == "reward":
        data = {}
        for side in ("chosen", "rejected"):
            data.update({f"{side}_tokens": tokens(),
                         f"{side}_length": _abstract((batch,), jnp.int32, per_row),
                         f"{side}_rating": _abstract((batch,), jnp.float32, per_row)})
        loss_fn, count = reward.reward_loss_fn(cfg), reward.pair_input_tokens
    else:
        data = {}
        for side in ("chosen", "rejected"):
            data.update({f"{side}_tokens": tokens(), f"{side}_response_mask": tokens(),
                         f"{side}_ref_logp": _abstract((batch,), jnp.float32, per_row)})
        loss_fn, count = dpo.dpo_loss_fn(cfg), reward.pair_input_tokens
    if kind == "dpo_reference":  # the frozen reference's log-probs, once before training
        data = {k: v for k, v in data.items() if not k.endswith("_ref_logp")}
        out = {}
        for name, weights in variants.items():
            fn = setup.partition_eval(
                lambda params, b, weights=weights: dpo.pair_logprobs(
                    cfg, params if weights is None else weights(params), b))
            out[name] = fn.lower(setup.abstract_state.params, data)
        return out
    kwargs = {} if count is None else {"input_tokens": count}
    return {name: setup.partition_step(make_train_step(
        loss_fn, optimizer, schedule, compute_params=weights, **kwargs)).lower(
            setup.abstract_state, data) for name, weights in variants.items()}


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def _by_dtype(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return " + ".join(f"{dtype} {_gib(n)}" for dtype, n in sorted(counts.items(),
                                                                 key=lambda kv: -kv[1]))


def main(argv=None):
    args = parse_args(argv)
    from aot_memory import config_from_args, parse_mesh, simulate_devices
    simulate_devices(args.devices)
    import jax

    from xwin_jax import hlo
    from xwin_jax.partitioning import Partitioner

    cfg = config_from_args(args, **({} if args.scan_layers else {"scan_layers": False}))
    partitioner = Partitioner(parse_mesh(args.mesh))
    print(f"{datetime.date.today()} jax {jax.__version__}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}; {args.preset} {cfg.num_layers} layers "
          f"({cfg.num_params() / 1e9:.2f}B params), mesh {dict(partitioner.sizes)}, params "
          f"{cfg.param_dtype} compute {cfg.dtype}, remat {cfg.remat_policy}, "
          f"{'scanned' if cfg.scan_layers else 'unscanned'} layers, batch {args.batch} x "
          f"{args.seq}; GiB per device, per step (a while body counts once)", flush=True)
    print(f"{'step':<14} {'text':<12} {'variant':<7} "
          + " ".join(f"{op:<28}" for op in OPS) + " all-gather after/before")
    for kind in args.steps.split(","):
        began = time.perf_counter()
        lowered = lowered_steps(kind, cfg, partitioner, args.batch, args.seq,
                                args.logits_chunk or None)
        counts = {}
        for name, low in lowered.items():
            partitioned, compiled = hlo.partitioned_hlo(low)
            counts[name] = {"partitioned": hlo.collective_bytes(partitioned),
                            "cpu final": hlo.collective_bytes(compiled.as_text())}
        for text in ("partitioned", "cpu final"):
            gathers = {name: sum(counts[name][text].get("all-gather", {}).values())
                       for name in counts}
            for name in ("before", "after"):
                ratio = (f"{gathers['after'] / gathers['before']:.3f}"
                         if name == "after" and gathers["before"] else "")
                print(f"{kind:<14} {text:<12} {name:<7} " + " ".join(
                    f"{_by_dtype(counts[name][text].get(op, {})):<28}" for op in OPS)
                    + f" {ratio}", flush=True)
        print(f"{'':<14} (compiled in {time.perf_counter() - began:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
