"""Generation throughput: our jitted KV-cache decoder vs transformers `generate`, same config,
same prompts, same run; greedy, a fixed number of new tokens (no early stop).

    python bench/generate.py                           # CPU: tiny and small58m, small shapes
    python bench/generate.py --configs tinyllama --batch 64 --prompt 128 --new 256 --static \
        --ours both                                    # GPU: vs the peer's compiled static cache

Prints new tokens/s for ours and the peer (dynamic cache; with --static also
cache_implementation="static", its compiled path) and the ratios. `--ours generate` (the
default) is `sampling.generate` on the params as trained (fp32, cast to the compute dtype
inside every step); `--ours decoder` is `decoding.Decoder` (weights resharded into the decode
layout and cast to the compute dtype once, as the generate job and PPO rollouts run);
`--ours both` times both and takes the decoder in the ratios. --skip_dynamic leaves the
dynamic-cache peer out; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import CONFIGS, on_gpu, peer_model  # noqa: E402
from xwin_jax import sampling  # noqa: E402
from xwin_jax.decoding import Decoder  # noqa: E402
from xwin_jax.models import llama  # noqa: E402
from xwin_jax.partitioning import Partitioner  # noqa: E402

NEVER = (-1,)  # a stop id no token has: every row generates the full budget


def bench_ours(cfg, prompts, new_tokens, iters, decoder=False):
    params = llama.init_params(cfg, jax.random.key(0))
    mask = np.ones_like(prompts)
    if decoder:  # the decode layout on every local device, compute-dtype weights
        decode = Decoder.create(cfg, Partitioner({"fsdp": -1}))
        params = jax.block_until_ready(decode.weights(params))

    def run():
        if decoder:
            out = decode.generate(params, prompts, mask, jax.random.key(0),
                                  max_new_tokens=new_tokens, stop_ids=NEVER)
        else:
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
    parser.add_argument("--ours", choices=["generate", "decoder", "both"], default="generate",
                        help="sampling.generate on the trained params, decoding.Decoder "
                             "(decode layout, compute-dtype weights), or both (the ratios "
                             "then use the decoder)")
    parser.add_argument("--skip_dynamic", action="store_true",
                        help="leave out the peer's dynamic-cache path")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    import torch
    if not on_gpu():
        torch.set_num_threads(os.cpu_count())
    batch = args.batch or (64 if on_gpu() else 16)
    prompt_len = args.prompt or (128 if on_gpu() else 64)
    new = args.new or (256 if on_gpu() else 64)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"greedy, batch {batch}, prompt {prompt_len}, {new} new tokens")
    ours = ["generate", "decoder"] if args.ours == "both" else [args.ours]
    columns = [f"{'ours' if o == 'generate' else o} tok/s" for o in ours] + (
        [] if args.skip_dynamic else ["dynamic tok/s", "ratio"]) + (
        ["static tok/s", "ratio"] if args.static else [])
    print(f"{'config':<10} " + " ".join(f"{c:>{max(len(c), 6)}}" for c in columns))
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(dtype="bfloat16" if on_gpu() else "float32",
                                    max_seq_len=max(CONFIGS[name].max_seq_len, prompt_len + new))
        prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len),
                                                    dtype=np.int32)
        row = {"config": name, "batch": batch, "prompt": prompt_len, "new_tokens": new,
               "dtype": cfg.dtype, "device": jax.devices()[0].device_kind}
        values = []
        for which in ours:  # the last one (the decoder with --ours both) is ours in the ratios
            key = "ours_tok_s" if which == "generate" else "decoder_tok_s"
            row[key] = best = batch * new / bench_ours(cfg, prompts, new, args.iters,
                                                       decoder=which == "decoder")
            values.append(best)
        peers = ([] if args.skip_dynamic else ["dynamic"]) + (["static"] if args.static else [])
        for cache in peers:
            row[f"{cache}_tok_s"] = batch * new / bench_peer(cfg, prompts, new, args.iters,
                                                             cache)
            row[f"ratio_{cache}"] = best / row[f"{cache}_tok_s"]
            values += [row[f"{cache}_tok_s"], row[f"ratio_{cache}"]]
        print(f"{name:<10} " + " ".join(
            f"{v:>{max(len(c), 6)}.2f}" if c == "ratio" else f"{v:>{max(len(c), 6)},.0f}"
            for c, v in zip(columns, values)), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
