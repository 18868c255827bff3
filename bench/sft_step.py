"""SFT train step throughput: ours (sharded jitted step: loss, grads, clipping, AdamW) vs
transformers + PyTorch (forward, backward, clip_grad_norm_, AdamW), same config, same run.

    python bench/sft_step.py                                   # CPU: tiny and small58m
    python bench/sft_step.py --configs tinyllama --batch 8 --seq 2048 --remat dots \
        --torch_compile                                        # GPU: the peer at its best

On a GPU both sides use bf16 compute with fp32 master weights (torch: autocast, fused
AdamW). Prints tokens/s, the ratio ours/peer (> 1: we are faster) and MFU against
--peak_tflops (the measured H200 bf16 peak by default).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import (add_common_args, cases, on_gpu, peer_model, report, setup_torch,  # noqa: E402
                    time_it)
from xwin_jax.partitioning import Partitioner  # noqa: E402
from xwin_jax.train import sft  # noqa: E402
from xwin_jax.train import state as train_state  # noqa: E402
from xwin_jax.train.sharded import ShardedTraining  # noqa: E402

LEARNING_RATE = 2e-5


def batch_of(tokens):
    return {"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
            "loss_weights": np.ones(tokens[:, 1:].shape, np.float32)}


def bench_ours(cfg, tokens, iters, warmup, logits_chunk):
    partitioner = Partitioner({"fsdp": -1})
    optimizer, schedule = train_state.OptimizerConfig(learning_rate=LEARNING_RATE).build(1000)
    setup = ShardedTraining.create("lm", cfg, partitioner, optimizer)
    step = setup.partition_step(sft.make_train_step(
        sft.sft_loss_fn(cfg, chunk_size=logits_chunk), optimizer, schedule,
        compute_params=setup.compute_params))
    batch = partitioner.shard_batch(batch_of(tokens))
    holder = {"state": setup.init_state()}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return time_it(run, iters, warmup)


def bench_torch(cfg, tokens, iters, warmup, compile_model):
    import torch

    model = peer_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.0,
                                  **({"fused": True} if on_gpu() else {"foreach": True}))
    forward = torch.compile(model) if compile_model else model
    device = "cuda" if on_gpu() else "cpu"
    toks = torch.as_tensor(tokens, device=device).long()

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu()):
            loss = forward(toks, labels=toks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu():
            torch.cuda.synchronize()

    return time_it(run, iters, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--logits_chunk", type=int, default=None)
    parser.add_argument("--torch_compile", action="store_true")
    args = parser.parse_args()
    setup_torch(f"SFT step, remat={args.remat} logits_chunk={args.logits_chunk}"
                f"{', peer torch.compile' if args.torch_compile else ''}")
    for name, cfg, batch, seq in cases(args):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1),
                                                   dtype=np.int32)
        ours = bench_ours(cfg, tokens, args.iters, args.warmup, args.logits_chunk)
        theirs = bench_torch(cfg, tokens[:, :seq], args.iters, args.warmup, args.torch_compile)
        report(name, cfg, batch, seq, ours, theirs, args.peak_tflops)


if __name__ == "__main__":
    main()
