"""The generate job: AlpacaEval output, bucketing that keeps prompt order, resumption."""

import json
import os

import jax
import numpy as np

from xwin_jax import generate, launch, sampling
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import converters, formats
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import llama


def write_prompts(tmp_path, count=7):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": f"Say {'hi ' * (i % 4 + 1)}please.",
                                 "dataset": "helpful_base"} for i in range(count)]))
    return str(path)


def test_generate_writes_alpaca_eval_and_resumes(tmp_path):
    cfg = llama.preset("tiny")
    params = llama.init_params(cfg, jax.random.key(0))
    save_params(str(tmp_path / "ckpt"), cfg, params)
    prompts_path = write_prompts(tmp_path)
    out_dir = tmp_path / "out"
    bindings = [f"CKPT_DIR = '{tmp_path / 'ckpt'}'", f"PROMPTS = '{prompts_path}'",
                f"OUTPUT_DIR = '{out_dir}'", "generate.generate_job.batch_size = 3",
                "generate.generate_job.max_new_tokens = 6",
                "generate.generate_job.temperature = 0.0"]
    first = launch.run_gin_job(["models/tiny.gin", "runs/generate.gin"], bindings)
    assert first["generated_now"] == 7
    alpaca = json.load(open(out_dir / "alpaca_eval.json"))
    prompts = formats.read_prompts(prompts_path).records
    assert [a["instruction"] for a in alpaca] == [p.text for p in prompts]
    assert {a["generator"] for a in alpaca} == {"xwin_jax"} and alpaca[0]["dataset"] == "helpful_base"

    # Each output is what greedy decoding of that prompt alone gives.
    vocab = ByteVocabulary()
    length = int(converters.prompts_batch([prompts[4].conversation], vocab, 1024)["mask"].sum())
    batch = converters.prompts_batch([prompts[4].conversation], vocab, length)  # no padding
    alone = sampling.generate(params, cfg, batch["tokens"], batch["mask"], jax.random.key(0),
                              max_new_tokens=6)
    assert alpaca[4]["output"] == vocab.decode(alone.tokens[0]).strip()

    # Kill after some prompts (simulated by dropping lines, one cut in half), rerun.
    lines = open(out_dir / "outputs.jsonl").readlines()
    with open(out_dir / "outputs.jsonl", "w") as f:
        f.writelines(lines[:3] + [lines[3][:10]])
    second = launch.run_gin_job(["models/tiny.gin", "runs/generate.gin"], bindings)
    assert second["generated_now"] == 4
    assert json.load(open(out_dir / "alpaca_eval.json")) == alpaca
    indices = [json.loads(line)["index"] for line in open(out_dir / "outputs.jsonl")]
    assert sorted(indices) == list(range(7))
    assert os.path.exists(out_dir / "operative_config.gin")
    assert np.isfinite([json.loads(line)["logprob"] for line in open(out_dir / "outputs.jsonl")]).all()
