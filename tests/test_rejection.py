"""Rejection sampling: best-of-n selection, the samples as a stage of their own (resumable,
kept when only the fine-tune changes), and the SFT on the winners."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import write_policy_and_reward

from xwin_jax import jobs
from xwin_jax.checkpoints.params import load_params
from xwin_jax.data import formats, xwin_set
from xwin_jax.data.vocabulary import ByteVocabulary, load_vocabulary
from xwin_jax.models import llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import rejection
from xwin_jax.train.stage import FINGERPRINT_FILE, SUMMARY_FILE, StageChanged
from xwin_jax.train.state import OptimizerConfig

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


def _entry(scores, finished, responses=None):
    responses = responses or [f"answer {i}" for i in range(len(scores))]
    return formats.XwinSetEntry(0, formats.Conversation((formats.Message("user", "Hi."),)),
                                tuple(responses), tuple(scores), tuple(finished))


def test_best_of_skips_unfinished_and_applies_the_threshold():
    scores = [0.5, 2.0, 1.0]
    assert xwin_set.best_of(_entry(scores, [True, True, True])) == 1
    assert xwin_set.best_of(_entry(scores, [True, False, True])) == 2
    assert xwin_set.best_of(_entry(scores, [True, False, True]), threshold=1.5) is None
    assert xwin_set.best_of(_entry(scores, [False, False, False])) is None
    assert xwin_set.best_of(_entry(scores, [True, True, True]), k=1) == 0  # the first only


def test_an_empty_answer_is_never_the_winner(tmp_path):
    """EOS at once is a finished, empty answer: no SFT example (SftData refuses it)."""
    formats.write_jsonl(str(tmp_path / rejection.SAMPLES_FILE), [
        {"index": 0, "prompt": "Hi.", "responses": ["", "hello", "hey"],
         "scores": [3.0, 1.0, 2.0], "finished": [True, True, False], "num_tokens": [1, 6, 8]},
        {"index": 1, "prompt": "Yo.", "responses": ["", " "], "scores": [1.0, 2.0],
         "finished": [True, True], "num_tokens": [1, 2]}])
    formats.write_jsonl(str(tmp_path / "prompts.jsonl"), [{"prompt": "Hi."}, {"prompt": "Yo."}])
    prompts = formats.read_prompts(str(tmp_path / "prompts.jsonl")).records
    selection = rejection.select_best(str(tmp_path), prompts, None)
    assert (selection["kept"], selection["mean_best_score"]) == (1, 1.0)
    [winner] = records(tmp_path / rejection.BEST_FILE)
    assert winner["conversations"][-1]["value"] == "hello"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rejection")
    # A policy that ends most responses quickly: EOS gets a large bias. Both checkpoints
    # record the byte vocabulary, which the job then uses (no vocabulary is given).
    write_policy_and_reward(root, CFG, ByteVocabulary(), stats=None)
    formats.write_jsonl(str(root / "prompts.jsonl"),
                        [{"prompt": f"Tell me about {i}."} for i in range(5)])
    return root


def train(root, workdir, learning_rate=1e-3, **kwargs):
    settings = dict(num_samples=4, sample_batch_size=4, max_new_tokens=12, max_prompt_len=128,
                    batch_size=2, seq_len=256, async_checkpoints=False,
                    partitioner=Partitioner({"data": 1, "fsdp": 2, "tensor": 1}))
    settings.update(kwargs)
    return rejection.train_rejection(
        str(workdir), CFG, 3, str(root / "prompts.jsonl"), policy_dir=str(root / "policy"),
        reward_dir=str(root / "rm"), optimizer=OptimizerConfig(learning_rate=learning_rate),
        **settings)


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """(summary, workdir) of a whole run."""
    workdir = tmp_path_factory.mktemp("run")
    return train(inputs, workdir), workdir


def records(path):
    return [json.loads(line) for line in open(path)]


def test_the_best_finished_sample_of_each_prompt_is_fine_tuned_on(finished):
    summary, workdir = finished
    samples = records(workdir / "xwin_set" / rejection.SAMPLES_FILE)
    assert [r["index"] for r in samples] == list(range(5))
    assert all(len(r["responses"]) == len(r["scores"]) == len(r["finished"]) == 4
               for r in samples)
    kept = [r for r in samples if any(r["finished"])]
    assert 0 < len(kept) == summary["selection"]["kept"]
    best = [int(np.argmax(np.where(r["finished"], r["scores"], -np.inf))) for r in kept]
    winners = records(workdir / "xwin_set" / rejection.BEST_FILE)
    assert [w["conversations"][-1]["value"] for w in winners] == [
        r["responses"][b] for r, b in zip(kept, best)]
    assert [w["conversations"][0]["value"] for w in winners] == [r["prompt"] for r in kept]
    assert summary["selection"]["mean_best_score"] == pytest.approx(
        np.mean([r["scores"][b] for r, b in zip(kept, best)]))
    assert summary["selection"]["mean_best_score"] >= summary["selection"]["mean_score"]
    assert summary["samples"]["prompts"] == 5 and summary["samples"]["num_samples"] == 4
    # The fine-tune: 3 SFT steps from the policy, exported with its tokenizer.
    assert summary["steps"] == 3 and load_params(summary["export_dir"])[0] == CFG
    assert load_vocabulary(summary["export_dir"]) == ByteVocabulary()
    recorded = json.load(open(workdir / "rejection" / FINGERPRINT_FILE))["fingerprint"]
    assert recorded["samples"] == summary["samples"]["fingerprint"]
    assert recorded["start"]["vocabulary"] == ByteVocabulary().fingerprint()


def test_a_killed_sampling_resumes_to_the_same_samples(inputs, finished, tmp_path, capsys):
    _, workdir = finished
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "xwin_set" / rejection.SAMPLES_FILE
    lines = path.read_text().splitlines()
    # Killed after two prompts (and half a line): no summary yet, the same command resumes.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    os.remove(tmp_path / "xwin_set" / SUMMARY_FILE)
    capsys.readouterr()
    train(inputs, tmp_path)
    assert path.read_text().splitlines() == lines
    assert "[rejection] already finished" in capsys.readouterr().out  # same samples


def test_only_what_changed_runs_again(inputs, finished, tmp_path, capsys):
    summary, workdir = finished
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    samples = tmp_path / "xwin_set" / rejection.SAMPLES_FILE
    drawn = samples.stat().st_mtime_ns
    capsys.readouterr()
    assert train(inputs, tmp_path) == summary
    out = capsys.readouterr().out
    assert "[xwin_set] already finished" in out and "[rejection] already finished" in out
    # Another sampling temperature: the samples are refused, naming it.
    with pytest.raises(StageChanged, match=r"temperature: 0\.7 → 1\.0") as err:
        train(inputs, tmp_path, temperature=1.0)
    assert "xwin_set" in str(err.value)
    # Another threshold or learning rate: the fine-tune is refused, the samples are kept.
    with pytest.raises(StageChanged, match=r"threshold: null → -100\.0"):
        train(inputs, tmp_path, threshold=-100.0)
    with pytest.raises(StageChanged, match=r"optimizer\.learning_rate: 0\.001 → 0\.002"):
        train(inputs, tmp_path, learning_rate=2e-3)
    with pytest.raises(ValueError, match="above the threshold"):
        train(inputs, tmp_path, threshold=1e9)
    # Best-of-3 from the same 4 samples: the samples stage is reused, the winners are the
    # best of each prompt's first three.
    capsys.readouterr()
    three = train(inputs, tmp_path, stage="rejection_k3", best_of=3)
    assert "[xwin_set] already finished" in capsys.readouterr().out
    assert samples.stat().st_mtime_ns == drawn and three["selection"]["best_of"] == 3
    drawn_records = records(samples)
    usable = [[f and bool(t.strip()) for f, t in zip(r["finished"][:3], r["responses"][:3])]
              for r in drawn_records]
    expected = [r["responses"][int(np.argmax(np.where(u, r["scores"][:3], -np.inf)))]
                for r, u in zip(drawn_records, usable) if any(u)]
    assert len(expected) == three["selection"]["kept"] >= 2
    assert [w["conversations"][-1]["value"] for w in records(
        tmp_path / "xwin_set" / "best_of_3.jsonl")] == expected
    # A sweep point with its own WORKDIR shares the samples through samples_dir.
    capsys.readouterr()
    point = train(inputs, tmp_path / "sweep_point", best_of=3,
                  samples_dir=str(tmp_path / "xwin_set"))
    assert "[xwin_set] already finished" in capsys.readouterr().out
    assert point["selection"] == three["selection"] and samples.stat().st_mtime_ns == drawn
    assert not (tmp_path / "sweep_point" / "xwin_set").exists()
    with pytest.raises(ValueError, match="best_of=5: choose k in 1..num_samples"):
        train(inputs, tmp_path, best_of=5)
    # With overwrite only the fine-tune runs again: the samples stay as they were drawn.
    again = jobs.run(lambda: train(inputs, tmp_path, learning_rate=2e-3), None, overwrite=True)
    assert again["fingerprint"] != summary["fingerprint"]
    assert again["samples"] == summary["samples"] and samples.stat().st_mtime_ns == drawn
    first_metrics = json.loads(open(tmp_path / "rejection" / "metrics.jsonl").readline())
    assert first_metrics["train/learning_rate"] == pytest.approx(2e-3)


def test_a_sample_batch_that_does_not_divide_over_the_mesh_is_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match="sample_batch_size=3 does not divide over the 2"):
        train(inputs, tmp_path, sample_batch_size=3)
    assert not os.listdir(tmp_path)


def test_length_buckets_sample_what_full_width_rows_sample_and_resume_exactly(inputs, tmp_path):
    """Mixed-length prompts: each batch padded to its own bucket (64, 128, 192 wide) samples
    and scores what each row gets alone at max_prompt_len; the file is in length order, read
    back by index; a run killed after two records reruns only the batches still missing a
    prompt and ends with the same file, byte for byte."""
    from xwin_jax import sampling
    from xwin_jax.data import converters
    from xwin_jax.models.spec import compute_weights
    from xwin_jax.rewards import RewardScorer
    from xwin_jax.train import rollout
    from xwin_jax.train.sharded import Start

    texts = ["b" * 170, "Hi.", "a" * 80, "Yo!"]  # sorted by length: 1, 3, 2, 0
    formats.write_jsonl(str(tmp_path / "mixed.jsonl"), [{"prompt": t} for t in texts])
    prompts = formats.read_prompts(str(tmp_path / "mixed.jsonl")).records
    policy = Start.policy(CFG, str(inputs / "policy"))
    partitioner = Partitioner({"data": 1, "fsdp": 2, "tensor": 1})
    settings = dict(partitioner=partitioner, num_samples=3, batch_size=4, max_new_tokens=8,
                    temperature=0.7, top_k=0, top_p=1.0, max_prompt_len=256, system="",
                    seed=0)
    ids = [converters.prompt_ids(p.conversation, policy.vocabulary, 256, "") for p in prompts]
    # 12 rows in 3 batches, prompts straddling them, three widths.
    assert [w for _, w in rejection.sample_batches(ids, 3, 4, 256)] == [64, 128, 192]

    stage = tmp_path / "bucketed"
    stage.mkdir()
    summary = rejection.sample_prompts(str(stage), prompts, policy, str(inputs / "rm"), CFG,
                                       **settings)
    assert summary["prompts"] == 4
    path = stage / rejection.SAMPLES_FILE
    lines = path.read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [1, 3, 2, 0]

    # Reference: every (prompt, sample) row alone in one unbucketed batch at full width.
    vocab = policy.vocabulary
    rows = [(i, j) for i in range(4) for j in range(3)]
    batch = converters.left_padded_batch([ids[i] for i, _ in rows], 256, vocab.pad_id)
    weights = compute_weights(load_params(str(inputs / "policy"))[1], CFG.dtype)
    generation = sampling.generate(weights, CFG, batch["tokens"], batch["mask"],
                                   rejection.sample_keys(0, rows), max_new_tokens=8,
                                   temperature=0.7, stop_ids=(vocab.eos_id,),
                                   pad_id=vocab.pad_id)
    assembled = rollout.assemble(batch["tokens"], batch["mask"], generation)
    scores = RewardScorer.load(str(inputs / "rm"), CFG, partitioner).score_tokens(
        assembled["tokens"], assembled["mask"])
    done = {r["index"]: r for r in map(json.loads, lines)}
    for k, (i, j) in enumerate(rows):
        assert done[i]["responses"][j] == generation.texts(vocab)[k], (i, j)
        assert done[i]["finished"][j] == bool(generation.finished[k])
        assert done[i]["num_tokens"][j] == int(generation.lengths[k])
        assert done[i]["scores"][j] == pytest.approx(float(scores[k]), abs=1e-5)

    # Killed after two records and half of the third: the rerun ends with the same bytes.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    rejection.sample_prompts(str(stage), prompts, policy, str(inputs / "rm"), CFG, **settings)
    assert path.read_text().splitlines() == lines


def test_the_first_k_of_n_samples_are_what_a_k_sample_run_draws(inputs, tmp_path):
    """Per-(prompt, sample) keys: sample j does not depend on n, so best-of-k for every
    k <= n comes from one sampling run."""
    from xwin_jax.train.sharded import Start

    prompts = formats.read_prompts(str(inputs / "prompts.jsonl")).records[:3]
    policy = Start.policy(CFG, str(inputs / "policy"))
    drawn = {}
    for n in (2, 3):
        stage = tmp_path / f"n{n}"
        stage.mkdir()
        rejection.sample_prompts(
            str(stage), prompts, policy, str(inputs / "rm"), CFG,
            partitioner=Partitioner({"data": 1, "fsdp": 2, "tensor": 1}), num_samples=n,
            batch_size=4, max_new_tokens=8, temperature=0.7, top_k=0, top_p=1.0,
            max_prompt_len=128, system=None, seed=0)
        drawn[n] = {r["index"]: r for r in records(stage / rejection.SAMPLES_FILE)}
    for index, few in drawn[2].items():
        many = drawn[3][index]
        assert few["responses"] == many["responses"][:2]
        assert few["finished"] == many["finished"][:2]
        np.testing.assert_allclose(few["scores"], many["scores"][:2], atol=1e-5)
