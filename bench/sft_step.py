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
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from forward import CONFIGS  # noqa: E402
from xwin_jax.partitioning import Partitioner  # noqa: E402
from xwin_jax.train import sft  # noqa: E402
from xwin_jax.train import state as train_state  # noqa: E402
from xwin_jax.train.sharded import ShardedTraining  # noqa: E402

LEARNING_RATE = 2e-5


def batch_of(tokens):
    return {"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
            "loss_weights": np.ones(tokens[:, 1:].shape, np.float32)}


def time_steps(run, iters, warmup):
    for _ in range(warmup):
        run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def bench_ours(cfg, tokens, iters, warmup, logits_chunk):
    partitioner = Partitioner({"fsdp": -1})
    schedule = train_state.make_schedule(LEARNING_RATE, 1000)
    optimizer = train_state.make_optimizer(schedule, max_grad_norm=1.0)
    setup = ShardedTraining.create(cfg, partitioner, optimizer)
    step = setup.partition_step(sft.make_train_step(
        sft.sft_loss_fn(cfg, chunk_size=logits_chunk), optimizer, schedule))
    batch = partitioner.shard_batch(batch_of(tokens))
    holder = {"state": setup.init_state()}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return time_steps(run, iters, warmup)


def bench_torch(cfg, tokens, iters, warmup, on_gpu, compile_model):
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    device = "cuda" if on_gpu else "cpu"
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.0,
                                  **({"fused": True} if on_gpu else {"foreach": True}))
    forward = torch.compile(model) if compile_model else model
    toks = torch.as_tensor(tokens, device=device).long()

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = forward(toks, labels=toks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()

    return time_steps(run, iters, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small58m")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--logits_chunk", type=int, default=None)
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=790.0)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    import torch
    if not on_gpu:
        torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"torch {torch.__version__}{' compiled' if args.torch_compile else ''}; "
          f"remat={args.remat} logits_chunk={args.logits_chunk}")
    print(f"{'config':<10} {'params':>8} {'batch x seq':>12} {'ours tok/s':>11} "
          f"{'torch tok/s':>12} {'ratio':>6} {'ours MFU':>9} {'torch MFU':>9}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(remat_policy=args.remat,
                                    dtype="bfloat16" if on_gpu else "float32")
        batch = args.batch or (8 if on_gpu else 4)
        seq = args.seq or (2048 if on_gpu else (128 if name == "tiny" else 256))
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1),
                                                   dtype=np.int32)
        ours = batch * seq / bench_ours(cfg, tokens, args.iters, args.warmup, args.logits_chunk)
        theirs = float("nan") if args.skip_torch else batch * seq / bench_torch(
            cfg, tokens[:, :seq], args.iters, args.warmup, on_gpu, args.torch_compile)
        flops = cfg.train_flops_per_token(seq) / (args.peak_tflops * 1e12)
        mfu = (lambda tps: f"{tps * flops:.1%}" if on_gpu else "n/a")
        print(f"{name:<10} {cfg.num_params() / 1e6:>7.1f}M {batch:>5} x {seq:<5} "
              f"{ours:>11,.0f} {theirs:>12,.0f} {ours / theirs:>6.2f} {mfu(ours):>9} "
              f"{mfu(theirs):>9}", flush=True)


if __name__ == "__main__":
    main()
