"""Ahead-of-time memory plan of the SFT step: compile for a simulated mesh, allocate nothing.

    python bench/aot_memory.py --preset llama2_7b --devices 8 --mesh fsdp=8 --batch 8 --seq 2048

Lowers the sharded train step (loss, grads, clipping, AdamW) on ShapeDtypeStructs for fake
CPU devices and prints what XLA's compiled program needs on each device: arguments (params
and optimizer state), temporaries (activations, gradients), and FLOPs. CPU compilation is a
proxy for the accelerator: layouts and fusion differ, the sharded state does not.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama2_7b")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=4,tensor=2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--logits_chunk", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    return parser.parse_args()


def main():
    args = parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import time

    import jax
    import jax.numpy as jnp

    from xwin_jax.models.config import preset
    from xwin_jax.partitioning import Partitioner
    from xwin_jax.train import sft
    from xwin_jax.train import state as train_state
    from xwin_jax.train.sharded import ShardedTraining

    mesh = {k: int(v) for k, v in (part.split("=") for part in args.mesh.split(","))}
    cfg = preset(args.preset, remat_policy=args.remat, dtype=args.dtype)
    partitioner = Partitioner(mesh)
    schedule = train_state.make_schedule(2e-5, 1000)
    optimizer = train_state.make_optimizer(schedule)
    setup = ShardedTraining.create(cfg, partitioner, optimizer)
    step = setup.partition_step(sft.make_train_step(
        sft.sft_loss_fn(cfg, chunk_size=args.logits_chunk), optimizer, schedule))
    sharding = partitioner.data_sharding(2)
    batch = {"input_tokens": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32,
                                                  sharding=sharding),
             "target_tokens": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32,
                                                   sharding=sharding),
             "loss_weights": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.float32,
                                                  sharding=sharding)}
    began = time.perf_counter()
    compiled = step.lower(setup.abstract_state, batch).compile()
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = 2 ** 30
    args_b, temp_b = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    out_b, alias_b = memory.output_size_in_bytes, memory.alias_size_in_bytes
    total = args_b + temp_b + out_b - alias_b
    print(f"{args.preset} ({cfg.num_params() / 1e9:.2f}B params), mesh {partitioner.sizes}, "
          f"batch {args.batch} x {args.seq}, remat {args.remat}, compute {args.dtype}, "
          f"fp32 params + AdamW; compiled in {seconds:.0f} s")
    print(f"per device: arguments {args_b / gib:.2f} GiB, temporaries {temp_b / gib:.2f} GiB, "
          f"outputs {out_b / gib:.2f} GiB (aliased {alias_b / gib:.2f}), "
          f"peak ≈ {total / gib:.2f} GiB")
    if cost and "flops" in cost:
        expected = cfg.train_flops_per_token(args.seq) * args.batch * args.seq
        print(f"FLOPs per device per step: model estimate {expected / partitioner.mesh.size:.3e}"
              f"; XLA's count {cost['flops']:.3e} (it counts a scanned layer body once)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
