"""Xwin-Pair annotation: a fake OpenAI-compatible judge on loopback that injects faults."""

import json

import jax
import pytest

from xwin_jax.annotate import judge as judge_lib
from xwin_jax.annotate import pairs as pairs_lib
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic
from xwin_jax.models import llama

ITEMS = [(f"Question {i}?", "short" * (1 + i % 2), "a much longer answer " * (2 + i))
         for i in range(6)]
FAULTS = ["429", "500", "timeout", "malformed", "truncated"]


def test_faults_are_retried_and_every_pair_is_judged_once(fake_judge, tmp_path):
    fake, judge = fake_judge(FAULTS)
    cache = str(tmp_path / "cache.jsonl")
    verdicts = pairs_lib.judge_pairs(ITEMS, judge, cache, concurrency=2)
    assert [v["better"] for v in verdicts] == ["A"] * 6  # the short answer is always A here
    assert all(v["rating_a"] == 9 and v["rating_b"] == 4 for v in verdicts)
    records = [json.loads(line) for line in open(cache)]
    assert len(records) == len({r["key"] for r in records}) == 6
    assert {r["swapped"] for r in records} == {True, False}  # both orders were shown
    assert judge.usage["retries"] >= len(FAULTS)
    assert judge.usage["prompt_tokens"] == 100 * judge.usage["calls"]
    assert "sk-secret-test" not in repr(judge)
    calls = fake.calls
    again = pairs_lib.judge_pairs(ITEMS, judge, cache)  # all cached: no new calls
    assert again == verdicts and fake.calls == calls


def test_a_killed_run_resumes_to_the_same_result(fake_judge, tmp_path):
    _, judge = fake_judge([])
    full = pairs_lib.judge_pairs(ITEMS, judge, str(tmp_path / "full.jsonl"))
    cache = tmp_path / "killed.jsonl"
    pairs_lib.judge_pairs(ITEMS[:3], judge, str(cache))
    with open(cache, "a") as f:
        f.write('{"key": "abc", "verd')  # the line a kill cut off
    resumed = pairs_lib.judge_pairs(ITEMS, judge, str(cache))
    assert resumed == full
    keys = [json.loads(line)["key"] for line in open(cache) if line.endswith("}\n")]
    assert len(keys) == len(set(keys)) == 6


def test_parse_verdict_rejects_what_it_cannot_use():
    assert judge_lib.parse_verdict('```json\n{"better": "b", "rating_a": 2, "rating_b": 8}\n```'
                                   )["better"] == "B"
    for bad in ("no json", '{"better": "C", "rating_a": 1, "rating_b": 2}',
                '{"better": "A", "rating_a": 11, "rating_b": 2}', '{"better": "A",'):
        with pytest.raises(ValueError):
            judge_lib.parse_verdict(bad)


def test_annotate_job_with_the_rule_judge_writes_readable_pairs(tmp_path, capsys):
    cfg = llama.preset("tiny")
    save_params(str(tmp_path / "ckpt"), cfg, llama.init_params(cfg, jax.random.key(0)))
    suite = synthetic.write_suite(str(tmp_path / "data"), seed=0, num_prompts=60)
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("".join(open(suite["prompts_test"]).readlines()[:4]))

    class ScriptedPolicyJudge(judge_lib.RuleJudge):
        """Random-weight policies answer gibberish: prefer the shorter one, scored 1-10."""
        def compare(self, prompt, a, b):
            better = "A" if len(a) < len(b) else "B" if len(b) < len(a) else "tie"
            return {"better": better, "rating_a": 6.0 if better == "A" else 3.0,
                    "rating_b": 6.0 if better == "B" else 3.0, "reason": "length"}

    kwargs = dict(ckpt_dir=str(tmp_path / "ckpt"), max_new_tokens=12, batch_size=4,
                  temperature=1.0)
    dry = pairs_lib.annotate_job(str(prompts), str(tmp_path / "out"), cfg,
                                 ScriptedPolicyJudge(), dry_run=True, **kwargs)
    assert dry["dry_run"] and "[Answer A]" in capsys.readouterr().out
    summary = pairs_lib.annotate_job(str(prompts), str(tmp_path / "out"), cfg,
                                     ScriptedPolicyJudge(), **kwargs)
    pairs = formats.read_pairs(summary["pairs_file"]).records
    assert len(pairs) == summary["pairs"] == summary["judged"] - summary["ties"] > 0
    assert all(len(p.chosen) <= len(p.rejected) and p.chosen_rating > p.rejected_rating
               for p in pairs)


def test_annotate_gin_run_dry_run(tmp_path, capsys):
    from xwin_jax import launch

    cfg = llama.preset("tiny")
    save_params(str(tmp_path / "ckpt"), cfg, llama.init_params(cfg, jax.random.key(0)))
    suite = synthetic.write_suite(str(tmp_path / "data"), seed=0, num_prompts=60)
    summary = launch.run_gin_job(["models/tiny.gin", "runs/annotate.gin"], [
        f"CKPT_DIR = '{tmp_path / 'ckpt'}'", f"PROMPTS = '{suite['prompts_test']}'",
        f"OUTPUT_DIR = '{tmp_path / 'out'}'", "pairs.annotate_job.max_new_tokens = 4",
        "pairs.annotate_job.dry_run = True"])
    assert summary["dry_run"] and "Which answer is better" in capsys.readouterr().out
    assert "OPENAI_API_KEY" not in open(tmp_path / "out" / "config.gin").read()
