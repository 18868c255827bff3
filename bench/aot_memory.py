"""Ahead-of-time memory plan of the SFT, reward-model and PPO steps: compile for a simulated
mesh, allocate nothing.

    python bench/aot_memory.py --step sft --preset llama2_7b --devices 8 --mesh fsdp=8 \
        --batch 8 --seq 2048 --remat full --logits_chunk 512
    python bench/aot_memory.py --step ppo --preset llama2_70b --devices 64 --mesh fsdp=64 \
        --batch 64 --prompt 512 --new 512 --device_memory_gib 88 --json

Lowers each step (the code the jobs run, see xwin_jax/aot.py) on ShapeDtypeStructs for fake
CPU devices and prints, per device: arguments (params + optimizer state), temporaries
(activations, gradients), outputs, the peak estimate, FLOPs (the 6N model vs XLA's count) and
whether it fits in --device_memory_gib. PPO also counts the frozen reference and reward models
and plans its three phases (rollout, scoring, update). CPU compilation is a proxy for the
accelerator: layouts and fusion differ, the sharded state does not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", default="sft", choices=("sft", "reward", "ppo", "all"))
    parser.add_argument("--preset", default="llama2_7b")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="override the preset's layer count (e.g. to check linear scaling)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--mesh", default="fsdp=-1",
                        help="e.g. data=1,fsdp=8,tensor=1 or fsdp=4,tensor=2 (-1: the rest)")
    parser.add_argument("--batch", type=int, default=8,
                        help="global rows (SFT), pairs (reward), prompts per rollout (PPO)")
    parser.add_argument("--seq", type=int, default=2048,
                        help="tokens per row; PPO: prompt + new when --prompt/--new are unset")
    parser.add_argument("--prompt", type=int, default=None, help="PPO prompt width")
    parser.add_argument("--new", type=int, default=None, help="PPO new tokens per prompt")
    parser.add_argument("--minibatches", type=int, default=4, help="PPO minibatches per batch")
    parser.add_argument("--decode_tensor", type=int, default=0,
                        help="PPO rollout: devices each weight is split over (decoding."
                             "DecodeLayout.tensor; 0 = the simulated devices capped to a divisor "
                             "of the KV heads, as the jobs do)")
    parser.add_argument("--micro_batches", type=int, default=1, help="SFT gradient accumulation")
    parser.add_argument("--unpacked", action="store_true",
                        help="SFT rows without segment_ids/positions (the SFT data packs them)")
    parser.add_argument("--remat", default="full", help="none | full | dots | dots_no_batch")
    parser.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--logits_chunk", type=int, default=512, help="SFT; 0 = whole sequence")
    parser.add_argument("--count_flops", action="store_true",
                        help="also XLA's FLOP count of the whole model (two extra compiles with "
                             "1 and 2 unscanned layers, extrapolated; loops otherwise count once)")
    parser.add_argument("--device_memory_gib", type=float, default=80.0)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per step instead of the text lines")
    return parser.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError as err:
        raise SystemExit(f"--mesh {text!r}: expected name=size pairs, e.g. fsdp=4,tensor=2 "
                         f"({err})") from None


def simulate_devices(count: int) -> None:
    """Before jax is imported: `count` simulated CPU devices (compile-only plans)."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def config_from_args(args, **overrides):
    """The preset of --preset with --remat, --dtype, --param_dtype and --num_layers."""
    from xwin_jax.models.config import preset

    overrides.update(remat_policy=args.remat, dtype=args.dtype, param_dtype=args.param_dtype)
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    return preset(args.preset, **overrides)


def main(argv=None):
    args = parse_args(argv)
    simulate_devices(args.devices)
    import jax

    from xwin_jax import aot
    from xwin_jax.decoding import DecodeLayout
    from xwin_jax.partitioning import Partitioner

    cfg = config_from_args(args)
    partitioner = Partitioner(parse_mesh(args.mesh))
    steps = aot.STEPS if args.step == "all" else (args.step,)
    failed = 0
    for step in steps:
        try:
            plan = aot.plan_step(step, cfg, partitioner, batch=args.batch, seq_len=args.seq,
                                 prompt_len=args.prompt, new_tokens=args.new,
                                 logits_chunk=args.logits_chunk or None,
                                 num_micro_batches=args.micro_batches,
                                 num_minibatches=args.minibatches, packed=not args.unpacked,
                                 count_flops=args.count_flops,
                                 decode_layout=DecodeLayout(args.decode_tensor))
        except ValueError as err:  # shapes that do not shard: say which, plan the other steps
            print(f"{step}: cannot plan: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if args.json:
            plan.update(preset=args.preset, device_memory_gib=args.device_memory_gib,
                        fits=aot.fits(plan, args.device_memory_gib), jax=jax.__version__,
                        backend=jax.default_backend(), date=datetime.date.today().isoformat(),
                        command=" ".join(["python", "bench/aot_memory.py"] + sys.argv[1:]))
            print(json.dumps(plan), flush=True)
        else:
            print(aot.format_plan(plan, args.device_memory_gib, args.preset), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
