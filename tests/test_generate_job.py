"""The generate job: AlpacaEval output, bucketing that keeps prompt order, resumption, and the
stage's fingerprint (skip, refuse, overwrite; the checkpoint's vocabulary)."""

import json
import os

import jax
import numpy as np
import pytest

from xwin_jax import generate, jobs, launch, sampling
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import converters, formats
from xwin_jax.data.vocabulary import ByteVocabulary, HFTokenizerVocabulary, bytes_to_unicode
from xwin_jax.models import llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.stage import FINGERPRINT_FILE, SUMMARY_FILE, StageChanged

CFG = llama.preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))
SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}


def write_prompts(tmp_path, count=7):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": f"Say {'hi ' * (i % 4 + 1)}please.",
                                 "dataset": "helpful_base"} for i in range(count)]))
    return str(path)


def merged_vocabulary(directory):
    """A tokenizer.json that is not the byte vocabulary: byte-level BPE with a few merges
    ("Say", " hi"), so the prompts tokenize to other (fewer) ids than with bytes."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    contents = ByteVocabulary()._contents()
    tok = json.loads(contents["tokenizer.json"])
    space = bytes_to_unicode()[ord(" ")]
    merges = [("S", "a"), ("Sa", "y"), (space, "h"), (space + "h", "i")]
    for a, b in merges:
        tok["model"]["vocab"][a + b] = len(tok["model"]["vocab"])
    tok["model"]["merges"] = [[a, b] for a, b in merges]
    contents["tokenizer.json"] = json.dumps(tok).encode()
    for name, data in contents.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return HFTokenizerVocabulary(os.path.join(directory, "tokenizer.json"))


def greedy_alone(params, prompt, vocab, max_new_tokens, with_logprob=False):
    """What greedy decoding of one prompt alone gives (and its summed log-prob), padded to
    another width than the job's (one compilation for every prompt)."""
    ids = converters.prompt_ids(prompt.conversation, vocab, 1024)
    batch = converters.left_padded_batch([ids], 256, vocab.pad_id)
    alone = sampling.generate(params, CFG, batch["tokens"], batch["mask"], jax.random.key(0),
                              max_new_tokens=max_new_tokens, stop_ids=(vocab.eos_id,),
                              pad_id=vocab.pad_id)
    logprob = float(np.sum(alone.logprobs[0, :int(alone.lengths[0])]))
    return (alone.texts(vocab)[0], logprob) if with_logprob else alone.texts(vocab)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sft"
    save_params(str(path), CFG, PARAMS, vocabulary=ByteVocabulary())
    return str(path)


def run(prompts, out_dir, ckpt_dir, overwrite=False, **kwargs):
    """The job as launch runs it (jobs.run), on one device, greedy, 6 tokens."""
    kwargs = {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 3,
              "partitioner": Partitioner(SINGLE), **kwargs}
    return jobs.run(lambda: generate.generate_job(prompts, str(out_dir), CFG,
                                                  ckpt_dir=ckpt_dir, **kwargs),
                    str(out_dir), overwrite=overwrite)


def test_generate_writes_alpaca_eval_and_resumes(tmp_path, ckpt):
    prompts_path = write_prompts(tmp_path)
    out_dir = tmp_path / "out"
    bindings = [f"CKPT_DIR = '{ckpt}'", f"PROMPTS = '{prompts_path}'",
                f"OUTPUT_DIR = '{out_dir}'", "generate.generate_job.batch_size = 3",
                "generate.generate_job.max_new_tokens = 6",
                "generate.generate_job.temperature = 0.0"]
    # The default partitioner: the batch (rounded up to 8 rows) over the 8 CPU devices.
    first = launch.run_gin_job(["models/tiny.gin", "runs/generate.gin"], bindings)
    assert first["generated_now"] == 7 and first["prompts"] == 7
    alpaca = json.load(open(out_dir / "alpaca_eval.json"))
    prompts = formats.read_prompts(prompts_path).records
    assert [a["instruction"] for a in alpaca] == [p.text for p in prompts]
    assert {a["generator"] for a in alpaca} == {"xwin_jax"}
    assert alpaca[0]["dataset"] == "helpful_base"
    # Each output is what greedy decoding of that prompt alone gives.
    records = generate.load_outputs(str(out_dir))
    for i in (0, 4, 6):
        text, logprob = greedy_alone(PARAMS, prompts[i], ByteVocabulary(), 6, with_logprob=True)
        assert alpaca[i]["output"] == records[i]["output"] == text
        assert records[i]["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert records[i]["num_tokens"] == 6 and not records[i]["finished"]

    # What kill -9 leaves: some batches appended, the last line cut in half, no summary.
    lines = open(out_dir / "outputs.jsonl").readlines()
    with open(out_dir / "outputs.jsonl", "w") as f:
        f.writelines(lines[:3] + [lines[3][:10]])
    os.remove(out_dir / SUMMARY_FILE)
    second = launch.run_gin_job(["models/tiny.gin", "runs/generate.gin"], bindings)
    assert second["generated_now"] == 4
    assert json.load(open(out_dir / "alpaca_eval.json")) == alpaca
    indices = [json.loads(line)["index"] for line in open(out_dir / "outputs.jsonl")]
    assert sorted(indices) == list(range(7))
    assert os.path.exists(out_dir / "operative_config.gin")


def test_a_rerun_skips_and_other_settings_or_checkpoints_are_refused(tmp_path, ckpt, capsys):
    prompts = write_prompts(tmp_path, count=3)
    out = tmp_path / "out"
    first = run(prompts, out, ckpt)
    outputs = (out / "outputs.jsonl").read_bytes()
    # The same command (the batch size is not a setting: keys are per prompt): skipped.
    again = run(prompts, out, ckpt, batch_size=2)
    assert "[generate] already finished" in capsys.readouterr().out
    assert again == first and (out / "outputs.jsonl").read_bytes() == outputs
    # Another temperature, or another checkpoint in the same place as before: refused,
    # naming what changed, with nothing touched.
    with pytest.raises(StageChanged, match=r"temperature: 0\.0 → 0\.7"):
        run(prompts, out, ckpt, temperature=0.7)
    other = tmp_path / "other"
    save_params(str(other), CFG, llama.init_params(CFG, jax.random.key(1)),
                vocabulary=ByteVocabulary())
    with pytest.raises(StageChanged, match=r"checkpoint\.params") as err:
        run(prompts, out, str(other))
    assert "overwrite=True" in err.value.hint
    assert (out / "outputs.jsonl").read_bytes() == outputs
    # With overwrite, the job starts over with the new checkpoint.
    params = llama.init_params(CFG, jax.random.key(1))
    redone = run(prompts, out, str(other), overwrite=True)
    assert redone["generated_now"] == 3
    alpaca = json.load(open(out / "alpaca_eval.json"))
    prompt = formats.read_prompts(prompts).records[1]
    assert alpaca[1]["output"] == greedy_alone(params, prompt, ByteVocabulary(), 6)
    assert alpaca[1]["output"] != json.loads(outputs.splitlines()[1])["output"]


def test_the_checkpoint_s_vocabulary_is_used_unless_one_is_given(tmp_path):
    vocab = merged_vocabulary(tmp_path / "tokenizer")
    ckpt_dir = tmp_path / "ckpt"
    save_params(str(ckpt_dir), CFG, PARAMS, vocabulary=vocab)
    prompts = write_prompts(tmp_path, count=4)
    records = formats.read_prompts(prompts).records
    assert len(converters.prompt_ids(records[0].conversation, vocab, 1024)) < len(
        converters.prompt_ids(records[0].conversation, ByteVocabulary(), 1024))
    run(prompts, tmp_path / "recorded", str(ckpt_dir))
    recorded = json.load(open(tmp_path / "recorded" / "alpaca_eval.json"))
    fingerprint = json.load(open(tmp_path / "recorded" / FINGERPRINT_FILE))["fingerprint"]
    assert fingerprint["vocabulary"]["kind"] == "hf_tokenizer"
    assert fingerprint["checkpoint"]["vocabulary"] == vocab.fingerprint()
    # Prompts tokenized (and answers decoded) with the checkpoint's tokenizer.
    assert [r["output"] for r in recorded] == [greedy_alone(PARAMS, p, vocab, 6)
                                               for p in records]
    run(prompts, tmp_path / "bytes", str(ckpt_dir), vocabulary="bytes")
    explicit = json.load(open(tmp_path / "bytes" / "alpaca_eval.json"))
    assert [r["output"] for r in explicit] == [greedy_alone(PARAMS, p, ByteVocabulary(), 6)
                                               for p in records]
    assert explicit != recorded
