"""The generate job: a prompts file → the chat template → batched generation → JSONL outputs
and an AlpacaEval-format JSON.

    python -m xwin_jax.launch --gin_file=gin/runs/generate.gin --gin.CKPT_DIR="'/runs/x/sft/final'" \
        --gin.PROMPTS="'alpaca_eval.json'" --gin.OUTPUT_DIR="'/runs/x/generate'"

Prompts are sorted by length and batched (length bucketing), padded to a multiple of 64 so few
shapes compile. Each finished batch is appended to OUTPUT_DIR/outputs.jsonl at once, so a
killed job rerun with the same command skips what it already wrote.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from xwin_jax import sampling
from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import load_params
from xwin_jax.data import converters, formats
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig

OUTPUTS_FILE = "outputs.jsonl"
ALPACA_EVAL_FILE = "alpaca_eval.json"
PAD_MULTIPLE = 64


def load_model(model: LlamaConfig, ckpt_dir: str | None = None, hf_dir: str | None = None):
    """(config, params) from a params checkpoint or an HF directory; numerics from `model`."""
    if bool(ckpt_dir) == bool(hf_dir):
        raise ConfigError("give exactly one of ckpt_dir (params checkpoint) and hf_dir")
    if hf_dir:
        return hf.load_hf(hf_dir, **model.runtime_fields())
    cfg, params = load_params(ckpt_dir, scan_layers=model.scan_layers)
    return cfg.replace(**model.runtime_fields()), params


def read_done(path: str) -> dict[int, dict]:
    """Outputs already written, by prompt index; a line cut off by a kill is dropped."""
    return formats.read_appended_jsonl(path, "index")


def _padded_width(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def generate_job(prompts_path: str, output_dir: str, model: LlamaConfig, *,
                 ckpt_dir: str | None = None, hf_dir: str | None = None,
                 vocabulary: str = "bytes", generator: str = "xwin_jax",
                 batch_size: int = 16, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 1.0, max_prompt_len: int = 1024,
                 system: str | None = None, seed: int = 0, skip_invalid: bool = False) -> dict:
    """Generates a response for every prompt not yet in OUTPUT_DIR/outputs.jsonl."""
    from tqdm import tqdm

    os.makedirs(output_dir, exist_ok=True)
    outputs_path = os.path.join(output_dir, OUTPUTS_FILE)
    prompts = formats.read_prompts(prompts_path, skip_invalid=skip_invalid).records
    vocab = get_vocabulary(vocabulary)
    done = read_done(outputs_path)
    pending = [i for i in range(len(prompts)) if i not in done]
    cfg, params = load_model(model, ckpt_dir, hf_dir)
    started, new_tokens = time.perf_counter(), 0
    ids = {i: converters.prompt_ids(prompts[i].conversation, vocab, max_prompt_len, system)
           for i in pending}
    pending.sort(key=lambda i: (len(ids[i]), i))
    bar = tqdm(total=len(prompts), initial=len(done), desc="generate", dynamic_ncols=True)
    with open(outputs_path, "a", encoding="utf-8") as out:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed batch shape
            width = _padded_width(max(len(ids[i]) for i in chunk))
            batch = converters.left_padded_batch([ids[i] for i in rows], width, vocab.pad_id)
            # A key per prompt: its sample does not depend on batch size, bucketing or resume.
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                jax.random.key(seed), np.asarray(rows, np.uint32))
            result = sampling.generate(
                params, cfg, batch["tokens"], batch["mask"], keys,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id)
            texts = result.texts(vocab)
            for r, index in enumerate(chunk):
                n = int(result.lengths[r])
                new_tokens += n
                out.write(formats.jsonl_line({
                    "index": index, "instruction": prompts[index].text,
                    "output": texts[r], "generator": generator,
                    "finished": bool(result.finished[r]), "num_tokens": n,
                    "logprob": float(np.sum(result.logprobs[r, :n]))}))
            out.flush()
            bar.update(len(chunk))
    bar.close()
    done = read_done(outputs_path)
    alpaca = [{"instruction": done[i]["instruction"], "output": done[i]["output"],
               "generator": generator,
               "dataset": prompts[i].record.get("dataset", os.path.basename(prompts_path))}
              for i in range(len(prompts))]
    with open(os.path.join(output_dir, ALPACA_EVAL_FILE), "w", encoding="utf-8") as f:
        json.dump(alpaca, f, ensure_ascii=False, indent=2)
    elapsed = time.perf_counter() - started
    summary = {"prompts": len(prompts), "generated_now": len(pending),
               "new_tokens": new_tokens, "seconds": round(elapsed, 2),
               "new_tokens_per_s": new_tokens / elapsed if pending else None,
               "outputs": outputs_path}
    print(f"[generate] {len(pending)} prompts generated now ({len(prompts)} in all) → "
          f"{output_dir}")
    return summary


def load_outputs(output_dir: str) -> list[dict[str, Any]]:
    """The outputs in prompt order."""
    done = read_done(os.path.join(output_dir, OUTPUTS_FILE))
    return [done[i] for i in sorted(done)]
