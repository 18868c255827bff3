"""The generate job: a prompts file → the chat template → batched generation → JSONL outputs
and an AlpacaEval-format JSON.

    python -m xwin_jax.launch --gin_file=gin/models/tiny.gin --gin_file=gin/runs/generate.gin \
        --gin.CKPT_DIR="'/runs/x/sft/final'" --gin.PROMPTS="'alpaca_eval.json'" \
        --gin.OUTPUT_DIR="'/runs/x/generate'"

CKPT_DIR is a params checkpoint or an HF directory; the prompts are tokenized with the
vocabulary it records unless VOCABULARY says otherwise. OUTPUT_DIR is a stage
(train/stage.py): its fingerprint is the prompts file's contents, the checkpoint's (by
content), the vocabulary and the sampling settings, so a rerun of a finished job skips, a
killed one resumes, and one pointed at another checkpoint or temperature is refused naming
what changed. Prompts are sorted by length and batched (length bucketing), padded to a
multiple of 64 so few shapes compile. Each finished batch is appended to
OUTPUT_DIR/outputs.jsonl at once (data/formats.py: append_jsonl), so a killed job resumes
after what it already wrote; each prompt samples with its own key, so what it gets does not
depend on the batch size, its batch-mates or the resume.

On N hosts (`--multihost`) every host reads every prompt and runs the same batches; the
policy is resharded once into the decode layout (decoding.py: weights split over each host's
devices, the batch over the hosts), every host gets every result, and host 0 alone writes, so
the files are those one host writes. The outputs file is the only state: a killed run resumes
on any number of hosts (the work directory must be shared, as for checkpoints).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from xwin_jax import fingerprint
from xwin_jax.data import converters, formats
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM
from xwin_jax.decoding import DecodeLayout, Decoder
from xwin_jax.partitioning import Partitioner, check_same_on_hosts, sync_hosts
from xwin_jax.train.sharded import Start, frozen_params
from xwin_jax.train.stage import run_stage, write_json

OUTPUTS_FILE = "outputs.jsonl"
ALPACA_EVAL_FILE = "alpaca_eval.json"


def read_done(path: str) -> dict[int, dict]:
    """Outputs already written, by prompt index; a line cut off by a kill is dropped."""
    return formats.read_appended_jsonl(path, "index")


def generate_job(prompts_path: str, output_dir: str, model: LlamaConfig, *,
                 ckpt_dir: str, vocabulary: Any = None, generator: str = "xwin_jax",
                 batch_size: int = 16, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 1.0, max_prompt_len: int = 1024,
                 system: str | None = None, seed: int = 0, skip_invalid: bool = False,
                 partitioner: Partitioner | None = None,
                 decode_layout: DecodeLayout | None = None) -> dict:
    """Generates a response for every prompt of PROMPTS into OUTPUT_DIR (a stage: see the
    module docstring). `ckpt_dir`: a params checkpoint or an HF directory; `vocabulary`
    (None: the checkpoint's) overrides the tokenizer it records; `decode_layout`: how the
    weights are split while decoding (decoding.DecodeLayout). Returns the summary."""
    prompts = formats.read_prompts(prompts_path, skip_invalid=skip_invalid).records
    start = Start.policy(model, ckpt_dir, vocabulary, what="CKPT_DIR")
    sampling_settings = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p)
    settings = {"prompts": fingerprint.file_identity(prompts_path), "skip_invalid": skip_invalid,
                "checkpoint": start.checkpoint, "model": start.config,
                "vocabulary": start.vocabulary, **sampling_settings,
                "max_prompt_len": max_prompt_len, "system": system, "seed": seed,
                "generator": generator}
    return run_stage(output_dir, "generate", settings, lambda stage_dir: _generate(
        stage_dir, prompts, os.path.basename(prompts_path), start,
        partitioner or Partitioner(), decode_layout, generator=generator, batch_size=batch_size,
        max_prompt_len=max_prompt_len, system=system, seed=seed, **sampling_settings))


def _generate(stage_dir: str, prompts: list[formats.Prompt], dataset: str, start: Start,
              partitioner: Partitioner, decode_layout: DecodeLayout | None, *, generator: str,
              batch_size: int, max_prompt_len: int, system: str | None, seed: int,
              **sampling_settings) -> dict:
    """The generate stage's body: what is not yet in outputs.jsonl, then alpaca_eval.json."""
    from tqdm import tqdm

    outputs_path = os.path.join(stage_dir, OUTPUTS_FILE)
    vocab, cfg = start.vocabulary, start.config
    done = read_done(outputs_path)
    check_same_on_hosts(list(done), f"the prompts already in {outputs_path}")
    sync_hosts("generate: outputs read")  # before host 0 appends to them
    pending = [i for i in range(len(prompts)) if i not in done]
    began, new_tokens = time.perf_counter(), 0
    decoder = Decoder.create(cfg, partitioner, decode_layout)
    if pending:
        weights = decoder.weights(frozen_params(start.checkpoint, LM, partitioner)[0])
    # A whole number of rows per device: the batch is split over the decode layout's copies.
    divisor = decoder.partitioner.batch_divisor
    batch_size = -(-batch_size // divisor) * divisor
    ids = {i: converters.prompt_ids(prompts[i].conversation, vocab, max_prompt_len, system)
           for i in pending}
    pending.sort(key=lambda i: (len(ids[i]), i))
    bar = tqdm(total=len(prompts), initial=len(done), desc="generate", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    for first in range(0, len(pending), batch_size):
        chunk = pending[first:first + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed batch shape
        width = converters.bucket_width(max(len(ids[i]) for i in chunk), limit=max_prompt_len)
        batch = converters.left_padded_batch([ids[i] for i in rows], width, vocab.pad_id)
        # A key per prompt: its sample does not depend on batch size, bucketing or resume.
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            jax.random.key(seed), np.asarray(rows, np.uint32))
        result = decoder.generate(weights, batch["tokens"], batch["mask"], keys,
                                  stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id,
                                  **sampling_settings)
        texts = result.texts(vocab)
        records = []
        for r, index in enumerate(chunk):
            n = int(result.lengths[r])
            new_tokens += n
            records.append({"index": index, "instruction": prompts[index].text,
                            "output": texts[r], "generator": generator,
                            "finished": bool(result.finished[r]), "num_tokens": n,
                            "logprob": float(np.sum(result.logprobs[r, :n]))})
        if jax.process_index() == 0:
            formats.append_jsonl(outputs_path, records)
        bar.update(len(chunk))
    bar.close()
    sync_hosts("generate: outputs written")
    done = read_done(outputs_path)
    write_json(os.path.join(stage_dir, ALPACA_EVAL_FILE), [
        {"instruction": done[i]["instruction"], "output": done[i]["output"],
         "generator": generator, "dataset": prompts[i].record.get("dataset", dataset)}
        for i in range(len(prompts))])
    elapsed = time.perf_counter() - began
    if jax.process_index() == 0:
        print(f"[generate] {len(pending)} prompts generated now ({len(prompts)} in all) → "
              f"{stage_dir}")
    return {"prompts": len(prompts), "generated_now": len(pending), "new_tokens": new_tokens,
            "seconds": round(elapsed, 2),
            "new_tokens_per_s": new_tokens / elapsed if pending else None,
            "decode_mesh": dict(decoder.partitioner.sizes), "outputs": outputs_path}


def load_outputs(output_dir: str) -> list[dict[str, Any]]:
    """The outputs in prompt order."""
    done = read_done(os.path.join(output_dir, OUTPUTS_FILE))
    return [done[i] for i in sorted(done)]
