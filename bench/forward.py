"""Forward+backward throughput: our Flax Llama vs transformers + PyTorch, same shapes, one run.

    python bench/forward.py                 # CPU: the tiny and a 56M config
    python bench/forward.py --configs tinyllama --batch 8 --seq 2048 --remat dots   # GPU

Both sides compute a next-token cross-entropy over random tokens and its gradient with respect
to every parameter; ours is one jitted value_and_grad, theirs `loss.backward()`. Prints tokens/s
for each and the ratio ours/theirs (> 1 means we are faster). On a GPU both run bf16 compute
with fp32 parameters (torch: autocast), and MFU is reported against --peak_tflops.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (add_common_args, cases, on_gpu, peer_model, report, setup_torch,  # noqa: E402
                    time_it)
from xwin_jax.models import llama  # noqa: E402


def bench_jax(cfg, tokens, iters, warmup):
    params = llama.init_params(cfg, jax.random.key(0))
    model = llama.Llama(cfg)

    def loss_fn(p, toks):
        logits = model.apply({"params": p}, toks[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    toks = jnp.asarray(tokens)

    def run():
        loss, grads = step(params, toks)
        jax.block_until_ready(grads)

    return time_it(run, iters, warmup)


def bench_torch(cfg, tokens, iters, warmup):
    import torch

    model = peer_model(cfg)
    device = "cuda" if on_gpu() else "cpu"
    toks = torch.as_tensor(tokens, device=device).long()

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu()):
            loss = model(toks, labels=toks).loss
        loss.backward()
        if on_gpu():
            torch.cuda.synchronize()

    return time_it(run, iters, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args()
    setup_torch(f"forward+backward, remat={args.remat} scan_layers={args.scan_layers}")
    for name, cfg, batch, seq in cases(args):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
        ours = bench_jax(cfg, tokens, args.iters, args.warmup)
        theirs = bench_torch(cfg, tokens[:, :seq], args.iters, args.warmup)
        report(name, cfg, batch, seq, ours, theirs, args.peak_tflops)


if __name__ == "__main__":
    main()
