"""Forward+backward throughput: our Flax Llama vs transformers + PyTorch, same shapes, one run.

    python bench/forward.py                 # CPU: the tiny and a ~58M config
    python bench/forward.py --configs tinyllama --batch 8 --seq 2048   # on a GPU

Both sides compute a next-token cross-entropy over random tokens and its gradient with respect
to every parameter; ours is one jitted value_and_grad, theirs `loss.backward()`. Prints tokens/s
for each and the ratio ours/theirs (> 1 means we are faster). On a GPU both run bf16 compute
with fp32 parameters (torch: autocast), and MFU is reported against --peak_tflops.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xwin_jax.models import llama  # noqa: E402
from xwin_jax.models.config import LlamaConfig, preset  # noqa: E402

CONFIGS = {
    "tiny": preset("tiny"),
    "small58m": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                            num_layers=8, num_heads=8, num_kv_heads=4, max_seq_len=2048),
    "tinyllama": preset("tinyllama_1b"),
}


def time_it(step, iters, warmup):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


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


def bench_torch(cfg, tokens, iters, warmup, on_gpu):
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    device = "cuda" if on_gpu else "cpu"
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    toks = torch.as_tensor(tokens, device=device)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(toks, labels=toks).loss
        loss.backward()
        if on_gpu:
            torch.cuda.synchronize()

    return time_it(run, iters, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small58m")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan_layers", choices=["preset", "true", "false"], default="preset",
                        help="override the preset's layer layout for our model")
    parser.add_argument("--peak_tflops", type=float, default=790.0,
                        help="measured bf16 peak of the GPU (H200 here: 790)")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    import torch
    if not on_gpu:
        torch.set_num_threads(os.cpu_count())
    print(f"backend: jax {jax.__version__} on {jax.devices()[0].device_kind}; "
          f"torch {torch.__version__} ({'cuda' if on_gpu else f'{torch.get_num_threads()} threads'})")
    print(f"remat={args.remat} scan_layers={args.scan_layers}")
    print(f"{'config':<10} {'params':>8} {'batch x seq':>12} {'ours tok/s':>11} "
          f"{'torch tok/s':>12} {'ratio':>6} {'ours MFU':>9}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(remat_policy=args.remat,
                                    dtype="bfloat16" if on_gpu else "float32")
        if args.scan_layers != "preset":
            cfg = cfg.replace(scan_layers=args.scan_layers == "true")
        batch = args.batch or (8 if on_gpu else 4)
        seq = args.seq or (2048 if on_gpu else (128 if name == "tiny" else 256))
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
        ours = bench_jax(cfg, tokens, args.iters, args.warmup)
        theirs = bench_torch(cfg, tokens[:, :seq], args.iters, args.warmup, on_gpu)
        tps_ours, tps_theirs = batch * seq / ours, batch * seq / theirs
        mfu = (f"{tps_ours * cfg.train_flops_per_token(seq) / (args.peak_tflops * 1e12):.1%}"
               if on_gpu else "n/a")
        print(f"{name:<10} {cfg.num_params() / 1e6:>7.1f}M {batch:>5} x {seq:<5} "
              f"{tps_ours:>11,.0f} {tps_theirs:>12,.0f} {tps_ours / tps_theirs:>6.2f} {mfu:>9}")


if __name__ == "__main__":
    main()
