"""Generation throughput: our jitted KV-cache decoder vs transformers `generate`, same config,
same prompts, same run; greedy, a fixed number of new tokens (no early stop).

    python bench/generate.py                           # CPU: tiny and small58m, small shapes
    python bench/generate.py --configs tinyllama --batch 64 --prompt 128 --new 256 --static
                                                       # GPU: vs the peer's compiled static cache

Prints new tokens/s for ours and the peer (dynamic cache; with --static also
cache_implementation="static", its compiled path) and the ratios.
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

from common import CONFIGS, on_gpu, peer_model  # noqa: E402
from xwin_jax import sampling  # noqa: E402
from xwin_jax.models import llama  # noqa: E402

NEVER = (-1,)  # a stop id no token has: every row generates the full budget


def bench_ours(cfg, prompts, new_tokens, iters):
    params = llama.init_params(cfg, jax.random.key(0))
    mask = np.ones_like(prompts)

    def run():
        out = sampling.generate(params, cfg, prompts, mask, jax.random.key(0),
                                max_new_tokens=new_tokens, stop_ids=NEVER)
        assert (out.lengths == new_tokens).all()

    run()  # compile
    began = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - began) / iters


def bench_peer(cfg, prompts, new_tokens, iters, cache):
    import torch

    model = peer_model(cfg).eval()
    if on_gpu():
        model = model.to(torch.bfloat16)
    device = "cuda" if on_gpu() else "cpu"
    ids = torch.as_tensor(prompts, device=device).long()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if on_gpu():
            torch.cuda.synchronize()

    run()  # warm-up (compiles the static path)
    began = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - began) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small58m")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (GPU), 16 (CPU)")
    parser.add_argument("--prompt", type=int, default=None, help="default 128 (GPU), 64 (CPU)")
    parser.add_argument("--new", type=int, default=None, help="default 256 (GPU), 64 (CPU)")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--static", action="store_true",
                        help="also time transformers' static-cache (compiled) path")
    args = parser.parse_args()
    import torch
    if not on_gpu():
        torch.set_num_threads(os.cpu_count())
    batch = args.batch or (64 if on_gpu() else 16)
    prompt_len = args.prompt or (128 if on_gpu() else 64)
    new = args.new or (256 if on_gpu() else 64)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"greedy, batch {batch}, prompt {prompt_len}, {new} new tokens")
    print(f"{'config':<10} {'ours tok/s':>11} {'dynamic tok/s':>14} {'ratio':>6}"
          + (f" {'static tok/s':>13} {'ratio':>6}" if args.static else ""))
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(dtype="bfloat16" if on_gpu() else "float32",
                                    max_seq_len=max(CONFIGS[name].max_seq_len, prompt_len + new))
        prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len),
                                                    dtype=np.int32)
        ours = batch * new / bench_ours(cfg, prompts, new, args.iters)
        dynamic = batch * new / bench_peer(cfg, prompts, new, args.iters, "dynamic")
        line = f"{name:<10} {ours:>11,.0f} {dynamic:>14,.0f} {ours / dynamic:>6.2f}"
        if args.static:
            static = batch * new / bench_peer(cfg, prompts, new, args.iters, "static")
            line += f" {static:>13,.0f} {ours / static:>6.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
