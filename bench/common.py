"""What the benchmarks share: configs, shapes, timing, and the transformers peer model."""

from __future__ import annotations

import argparse
import os
import time

import jax

from xwin_jax.models.config import LlamaConfig, preset

CONFIGS = {
    "tiny": preset("tiny"),
    "small58m": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                            num_layers=8, num_heads=8, num_kv_heads=4, max_seq_len=2048),
    "tinyllama": preset("tinyllama_1b"),
}
TABLE_HEADER = (f"{'config':<10} {'params':>8} {'batch x seq':>12} {'ours tok/s':>11} "
                f"{'torch tok/s':>12} {'ratio':>6} {'ours MFU':>9} {'torch MFU':>9}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="tiny,small58m", help=f"from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 4 on CPU")
    parser.add_argument("--seq", type=int, default=None,
                        help="default: 2048 on GPU; on CPU 128 (tiny) or 256")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan_layers", choices=["preset", "true", "false"], default="preset",
                        help="override the preset's layer layout for our model")
    parser.add_argument("--peak_tflops", type=float, default=790.0,
                        help="bf16 peak for MFU (the H200's measured 790 by default)")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def setup_torch(description: str) -> None:
    """Gives PyTorch every CPU core (as XLA has) and prints what runs where."""
    import torch
    if not on_gpu():
        torch.set_num_threads(os.cpu_count())
    where = "cuda" if on_gpu() else f"{torch.get_num_threads()} threads"
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"torch {torch.__version__} ({where}); {description}")
    print(TABLE_HEADER)


def cases(args):
    """(name, config, batch, seq) for each requested config, with the run's numerics."""
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(remat_policy=args.remat,
                                    dtype="bfloat16" if on_gpu() else "float32")
        if args.scan_layers != "preset":
            cfg = cfg.replace(scan_layers=args.scan_layers == "true")
        batch = args.batch or (8 if on_gpu() else 4)
        seq = args.seq or (2048 if on_gpu() else (128 if name == "tiny" else 256))
        yield name, cfg, batch, seq


def report(name, cfg, batch, seq, ours_s, theirs_s, peak_tflops) -> None:
    """One table row from seconds per step."""
    ours, theirs = batch * seq / ours_s, batch * seq / theirs_s
    flops = cfg.train_flops_per_token(seq) / (peak_tflops * 1e12)
    mfu = (lambda tps: f"{tps * flops:.1%}" if on_gpu() else "n/a")  # noqa: E731
    print(f"{name:<10} {cfg.num_params() / 1e6:>7.1f}M {batch:>5} x {seq:<5} "
          f"{ours:>11,.0f} {theirs:>12,.0f} {ours / theirs:>6.2f} {mfu(ours):>9} "
          f"{mfu(theirs):>9}", flush=True)


def time_it(step, iters: int, warmup: int) -> float:
    """Seconds per call after `warmup` untimed calls; `step` must block until done."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def peer_model(cfg: LlamaConfig):
    """transformers LlamaForCausalLM of the same config (SDPA attention), in train mode."""
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_config).to("cuda" if on_gpu() else "cpu").train()
