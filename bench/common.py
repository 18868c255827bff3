"""What the benchmarks share: configs, shapes, timing, and the transformers peer model."""

from __future__ import annotations

import argparse
import os
import re
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


# --- collectives in compiled HLO --------------------------------------------------------------

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([^\]]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _top_level(type_text: str) -> list[str]:
    """A tuple type's top-level elements ('(a, (b, c))' → ['a', '(b, c)']); else [type]."""
    text = type_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i])
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def _shape_bytes(type_text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype not in DTYPE_BYTES:
            continue
        count = 1
        for d in dims.replace("<=", "").split(","):
            if d.strip():
                count *= int(d)
        out[dtype] = out.get(dtype, 0) + count * DTYPE_BYTES[dtype]
    return out


def collective_bytes(hlo_text: str, inside_loops: bool = False) -> dict[str, dict[str, int]]:
    """Bytes of every collective in an HLO module's text (e.g. `compiled.as_text()`), by op
    and dtype: {"all-gather": {"bf16": n, "f32": m}, "reduce-scatter": {...}, ...}; ops that
    do not occur are absent.

    Each instruction counts its *result* shape(s), elements x dtype size, per device: an
    all-gather's gathered array, a reduce-scatter's shard, an all-reduce's whole array. Async
    pairs count once: `all-gather-start` by its output half (its tuple also holds the
    operands), `collective-permute-start` by its output, `all-reduce-start` by its result,
    `*-done` not at all, and an `async-start` wrapper through the op in the computation it
    calls. A while loop's body counts once, not once per iteration.

    inside_loops: only the collectives of computations reachable from a `while` body
    (scanned layers, micro-batches, logits chunks, decode loops)."""
    computations: dict[str, list[tuple[str, str]]] = {}
    calls: dict[str, set[str]] = {}
    bodies: set[str] = set()
    current = None
    for line in hlo_text.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if not line[0].isspace():  # a computation header ("%name (...) -> ... {", "ENTRY ...")
            if line.rstrip().endswith("{"):
                head = line[len("ENTRY "):] if line.startswith("ENTRY ") else line
                current = head.split()[0].split("(")[0].lstrip("%")
                computations.setdefault(current, [])
                calls.setdefault(current, set())
            continue
        if current is None:
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        type_text, op = match.groups()
        called = set(_CALLED.findall(line))
        for branches in _BRANCHES.findall(line):
            called.update(b.strip().lstrip("%") for b in branches.split(",") if b.strip())
        calls[current].update(called)
        if op == "while":
            bodies.update(re.findall(r"\bbody=%?([\w.\-]+)", line))
        computations[current].append((op, type_text))

    names = set(computations)
    if inside_loops:
        names, todo = set(), list(bodies)
        while todo:
            name = todo.pop()
            if name not in names:
                names.add(name)
                todo.extend(calls.get(name, ()))

    totals: dict[str, dict[str, int]] = {}
    for name in names:
        for op, type_text in computations.get(name, ()):
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES or op.endswith("-done"):
                continue
            parts = _top_level(type_text)
            if op == "all-gather-start" and len(parts) > 1:
                parts = parts[len(parts) // 2:]
            elif op == "collective-permute-start" and len(parts) > 1:
                parts = parts[1:2]
            for dtype, n in _shape_bytes(" ".join(parts)).items():
                by_dtype = totals.setdefault(base, {})
                by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    return totals
