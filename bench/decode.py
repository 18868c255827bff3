"""The decode layout against the training layout, on 8 simulated CPU devices, mesh fsdp=8.

    python bench/decode.py                    # both parts (~2 min on 2 cores)
    python bench/decode.py --skip_timing      # only the compiled-program bytes
    python bench/decode.py --json out.json    # also write the numbers

1. Bytes per device moved by collectives, read from the compiled generate program
   (sampling.generate_program, lowered as xwin_jax/aot.py lowers the PPO rollout, on
   ShapeDtypeStructs: nothing is allocated) for Llama-2-7B shapes cut to 2 layers: inside the
   decode loop per step (the layer loop inside it counted once per layer), and outside it
   (prefill, plus what XLA hoists out of the loop), training layout (fp32 params, embed over
   fsdp) vs decode layout (Decoder.abstract_weights: compute dtype, heads/mlp/vocab over
   tensor=8).
2. Rollout wall time on a small model that runs on CPU: sampling.generate on the training
   layout vs Decoder.generate on the decode layout (and the one-off Decoder.weights reshard),
   median of --repeats after a warm-up; the default decode layout (tensor=8) and, with
   --tensors, others (tensor=1: a whole copy per device, no collectives per step).

Benchmarks print numbers and never assert times; on 8 simulated devices sharing a few cores
the times are indicative, the ratios are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from xwin_jax import hlo, sampling  # noqa: E402
from xwin_jax.checkpoints.manager import abstract_like  # noqa: E402
from xwin_jax.decoding import Decoder, DecodeLayout  # noqa: E402
from xwin_jax.models.config import LlamaConfig, preset  # noqa: E402
from xwin_jax.models.spec import LM, spec  # noqa: E402
from xwin_jax.partitioning import Partitioner  # noqa: E402

NEVER = (-1,)  # a stop id no token has: every row generates the full budget
# A rollout samples (temperature 1, no filtering): sampling mode 'sample'.
ROLLOUT_SETTINGS = dict(temperature=1.0, top_k=0, top_p=1.0)


def lower_rollout(params, cfg: LlamaConfig, partitioner: Partitioner, batch: int,
                  prompt_len: int, new_tokens: int):
    """The rollout's generate program compiled on abstract inputs: exactly aot.plan_ppo's
    'rollout' lowering (prompts over (data, fsdp), replicated keys, host settings), with the
    params (abstract, carrying their shardings) given."""
    rows = partitioner.data_sharding(2)
    prompts = {name: jax.ShapeDtypeStruct((batch, prompt_len), np.int32, sharding=rows)
               for name in ("tokens", "mask")}
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=partitioner.replicated)
    settings = sampling.row_settings(batch, **ROLLOUT_SETTINGS)
    with partitioner.activation_context():
        return sampling.generate_program.lower(
            params, prompts["tokens"], prompts["mask"], keys, settings, cfg=cfg,
            max_new_tokens=new_tokens, mode=sampling.sampling_mode(settings, cfg.vocab_size),
            stop_ids=(2,), pad_id=0).compile()


def split_by_decode_loop(hlo_text: str) -> dict[str, dict[str, dict[str, int]]]:
    """{'per_step': {op: {dtype: bytes}}, 'outside': {...}}: the collectives of one decode step
    (the top-level while loop XLA cannot count the trips of; loops inside it, the layers,
    weighted by their trip counts) and those of the rest of the program (prefill with its
    layer loop weighted, and anything hoisted out of the decode loop)."""
    loops = hlo.loops(hlo_text)
    nested = {lp.body for lp in loops} | {lp.condition for lp in loops}
    decode = [lp for lp in loops if lp.trip_count is None and lp.computation not in nested]
    if len(decode) != 1:
        raise RuntimeError(f"expected one decode loop, found {[lp.name for lp in decode]}")
    found = hlo.collectives(hlo_text)
    inside = [c for c in found if decode[0] in c.loops]
    outside = [c for c in found if decode[0] not in c.loops]
    return {"per_step": hlo.total_bytes(inside, per=decode[0]),
            "outside": hlo.total_bytes(outside)}


def _sum(by_dtype: dict[str, int] | None) -> int:
    return sum((by_dtype or {}).values())


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB" if n >= 2 ** 16 else f"{n / 2 ** 10:,.2f} KiB"


def compiled_bytes(batch: int, prompt_len: int, new_tokens: int) -> dict:
    cfg = preset("llama2_7b", num_layers=2)
    training = Partitioner({"data": 1, "fsdp": 8, "tensor": 1})
    decoder = Decoder.create(cfg, training)
    layouts = {
        "training": (abstract_like(spec(LM).shapes(cfg), spec(LM).shardings(cfg, training)),
                     training),
        "decode": (decoder.abstract_weights(), decoder.partitioner),
    }
    print(f"Llama-2-7B shapes, 2 layers ({cfg.num_params() / 1e9:.2f}B params), compute "
          f"{cfg.dtype}, params {cfg.param_dtype}; rollout batch {batch}, prompt {prompt_len}, "
          f"{new_tokens} new tokens; 8 simulated devices")
    out = {}
    for name, (params, part) in layouts.items():
        began = time.perf_counter()
        text = lower_rollout(params, cfg, part, batch, prompt_len, new_tokens).as_text()
        seconds = time.perf_counter() - began
        split = split_by_decode_loop(text)
        out[name] = {"mesh": part.sizes, "compile_s": round(seconds, 1), **split}
    # The weights of one decode step, for scale: every matrix once in the compute dtype.
    weight_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(decoder.abstract_weights()))
    print(f"(all weights in {cfg.dtype}: {_mb(weight_bytes)})")
    print(f"{'layout':<9} {'mesh':<22} {'all-gather/step':>16} {'all-reduce/step':>16} "
          f"{'all-gather outside':>19} {'all-reduce outside':>19}")
    for name, r in out.items():
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
        print(f"{name:<9} {mesh:<22} {_mb(_sum(r['per_step'].get('all-gather'))):>16} "
              f"{_mb(_sum(r['per_step'].get('all-reduce'))):>16} "
              f"{_mb(_sum(r['outside'].get('all-gather'))):>19} "
              f"{_mb(_sum(r['outside'].get('all-reduce'))):>19}")
        print(f"{'':<9} per step by op/dtype: {r['per_step']}")
    before = _sum(out["training"]["per_step"].get("all-gather"))
    after = _sum(out["decode"]["per_step"].get("all-gather"))
    ratio = before / after if after else float("inf")
    print(f"all-gathered bytes per decode step, training / decode layout: {ratio:,.0f}x "
          f"({_mb(before)} → {_mb(after)})")
    return {"config": "llama2_7b, 2 layers", "batch": batch, "prompt": prompt_len,
            "new_tokens": new_tokens, "weight_bytes": weight_bytes, "layouts": out,
            "all_gather_per_step_ratio": ratio}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def rollout_times(batch: int, prompt_len: int, new_tokens: int, repeats: int, dtype: str,
                  tensors: tuple[int, ...]) -> dict:
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4,
                      num_heads=8, num_kv_heads=8, max_seq_len=prompt_len + new_tokens,
                      dtype=dtype)
    training = Partitioner({"data": 1, "fsdp": 8, "tensor": 1})
    params = training.init(lambda: spec(LM).init(cfg, jax.random.key(0)),
                           spec(LM).shardings(cfg, training))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len),
                                                dtype=np.int32)
    mask = np.ones_like(prompts)
    kwargs = dict(max_new_tokens=new_tokens, stop_ids=NEVER, **ROLLOUT_SETTINGS)

    def before():
        out = sampling.generate(params, cfg, prompts, mask, jax.random.key(0),
                                partitioner=training, **kwargs)
        assert (out.lengths == new_tokens).all()

    print(f"rollout: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size}, {dtype}; batch {batch}, prompt {prompt_len}, {new_tokens} new "
          f"tokens, sampled; median of {repeats} after a warm-up")
    t_before = _median_seconds(before, repeats)
    print(f"{'layout':<9} {'mesh':<22} {'rollout s':>10} {'new tok/s':>10} {'speed-up':>9}")
    print(f"{'training':<9} {'fsdp8':<22} {t_before:>10.3f} "
          f"{batch * new_tokens / t_before:>10,.0f} {1.0:>8.2f}x", flush=True)
    rows = []
    for tensor in tensors:
        decoder = Decoder.create(cfg, training, DecodeLayout(tensor))
        holder = {}

        def reshard(decoder=decoder, holder=holder):
            holder["weights"] = jax.block_until_ready(decoder.weights(params))

        def after(decoder=decoder, holder=holder):
            out = decoder.generate(holder["weights"], prompts, mask, jax.random.key(0),
                                   **kwargs)
            assert (out.lengths == new_tokens).all()

        t_reshard = _median_seconds(reshard, repeats)
        t_after = _median_seconds(after, repeats)
        mesh = "data{data} x tensor{tensor}".format(**decoder.partitioner.sizes)
        print(f"{'decode':<9} {mesh:<22} {t_after:>10.3f} "
              f"{batch * new_tokens / t_after:>10,.0f} {t_before / t_after:>8.2f}x   "
              f"(+ weights() reshard {t_reshard:.3f} s: "
              f"{t_before / (t_after + t_reshard):.2f}x)", flush=True)
        rows.append({"mesh": decoder.partitioner.sizes, "decode_s": t_after,
                     "reshard_s": t_reshard, "speedup": t_before / t_after,
                     "speedup_with_reshard": t_before / (t_after + t_reshard)})
    return {"dtype": dtype, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
            "hidden": cfg.hidden_size, "layers": cfg.num_layers, "repeats": repeats,
            "training_s": t_before, "decode": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes_batch", type=int, default=16)
    parser.add_argument("--bytes_prompt", type=int, default=128)
    parser.add_argument("--bytes_new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32",
                        help="compute dtypes of the timed model, comma-separated")
    parser.add_argument("--tensors", default="0,1",
                        help="decode layouts to time: DecodeLayout.tensor values (0: all 8)")
    parser.add_argument("--skip_bytes", action="store_true")
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    results = {}
    if not args.skip_bytes:
        results["bytes"] = compiled_bytes(args.bytes_batch, args.bytes_prompt, args.bytes_new)
    if not args.skip_timing:
        tensors = tuple(int(t) for t in args.tensors.split(","))
        results["timing"] = [rollout_times(args.batch, args.prompt, args.new, args.repeats,
                                           dtype, tensors) for dtype in args.dtypes.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
