"""The quickstart: every stage that exists, in order, on one work directory.

Stages so far (the recipe's training stages join as they land):
  model — build the model from its config, save a params checkpoint, export it to HF
          safetensors, import it back, check the logits are unchanged, and decode a few
          tokens greedily from the re-imported weights.

Each stage writes WORKDIR/<stage>/summary.json when it finishes; a rerun skips finished stages.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from xwin_jax import sampling
from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import save_params
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, init_params

SUMMARY_FILE = "summary.json"
BYTE_OFFSET = 3  # ids 0-2 are pad, BOS, EOS; byte b is id b + 3


def model_stage(stage_dir: str, model: LlamaConfig, seed: int, prompt: str,
                num_tokens: int) -> dict:
    params = init_params(model, jax.random.key(seed))
    print(f"[model] built {model.num_params() / 1e6:.2f}M-parameter Llama "
          f"({model.num_layers} layers, hidden {model.hidden_size}, {model.num_heads} heads / "
          f"{model.num_kv_heads} KV heads)")
    ckpt_dir = os.path.join(stage_dir, "params")
    save_params(ckpt_dir, model, params)
    print(f"[model] saved params checkpoint → {ckpt_dir}")
    hf_dir = os.path.join(stage_dir, "hf")
    hf.save_hf(model, params, hf_dir, dtype="float32")
    print(f"[model] exported HF safetensors → {hf_dir}")
    reimported_cfg, reimported = hf.load_hf(hf_dir, **model.runtime_fields())
    prompt_ids = [1] + [b + BYTE_OFFSET for b in prompt.encode()]
    tokens = jnp.asarray([prompt_ids])
    before = Llama(model).apply({"params": params}, tokens)
    after = Llama(reimported_cfg).apply({"params": reimported}, tokens)
    max_diff = float(jnp.abs(before - after).max())
    print(f"[model] re-imported from HF: config equal = {reimported_cfg == model}, "
          f"max |Δlogits| = {max_diff:.2e}")
    if reimported_cfg != model or max_diff > 1e-5:
        raise RuntimeError(f"HF round trip changed the model (max |Δlogits| = {max_diff})")
    generated = sampling.generate(reimported, reimported_cfg, [prompt_ids],
                                  [[1] * len(prompt_ids)], jax.random.key(seed),
                                  max_new_tokens=num_tokens).tokens[0].tolist()
    print(f"[model] greedy continuation of {prompt!r} ({num_tokens} tokens, random weights): "
          f"{generated}")
    return {"num_params": model.num_params(), "hf_dir": hf_dir, "params_dir": ckpt_dir,
            "round_trip_max_abs_logit_diff": max_diff, "prompt": prompt,
            "greedy_token_ids": generated}


def run(workdir: str, model: LlamaConfig, seed: int = 0,
        prompt: str = "USER: Hi! ASSISTANT:", num_tokens: int = 8) -> dict:
    """Runs the stages in order; returns {stage: summary}."""
    stages = {"model": lambda d: model_stage(d, model, seed, prompt, num_tokens)}
    results = {}
    for name, stage in stages.items():
        stage_dir = os.path.join(workdir, name)
        summary_path = os.path.join(stage_dir, SUMMARY_FILE)
        if os.path.exists(summary_path):
            print(f"[{name}] already done ({summary_path}); skipping")
            with open(summary_path) as f:
                results[name] = json.load(f)
            continue
        os.makedirs(stage_dir, exist_ok=True)
        start = time.perf_counter()
        summary = stage(stage_dir)
        summary["wall_time_s"] = round(time.perf_counter() - start, 2)
        with open(summary_path + ".partial", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(summary_path + ".partial", summary_path)
        results[name] = summary
        print(f"[{name}] done in {summary['wall_time_s']} s → {summary_path}")
    return results
