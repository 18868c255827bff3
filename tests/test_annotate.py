"""Xwin-Pair annotation: a fake OpenAI-compatible judge on loopback that injects faults."""

import json

import jax
import pytest

from conftest import GARBAGE
from xwin_jax import jobs
from xwin_jax.annotate import judge as judge_lib
from xwin_jax.annotate import pairs as pairs_lib
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import UserError
from xwin_jax.generate import load_outputs
from xwin_jax.models import llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.stage import FINGERPRINT_FILE, SUMMARY_FILE, StageChanged

ITEMS = [(f"Question {i}?", "short" * (1 + i % 2), "a much longer answer " * (2 + i))
         for i in range(6)]
TRANSPORT_FAULTS = ["429", "500", "timeout"]
# Replies that arrive but cannot be used once (asked again, then judged), and one cut off
# after a complete verdict (accepted at once).
REPLY_FAULTS = {"Question 1?": ["malformed"], "Question 4?": ["truncated"],
                "Question 2?": ["truncated_complete"]}
VERDICT = {"better": "B", "rating_a": 3, "rating_b": 8, "reason": "B is right"}


def test_faults_are_retried_and_every_pair_is_judged_once(fake_judge, tmp_path):
    fake, judge = fake_judge(TRANSPORT_FAULTS, by_prompt=REPLY_FAULTS)
    cache = str(tmp_path / "cache.jsonl")
    verdicts, unjudged = pairs_lib.judge_pairs(ITEMS, judge, cache, concurrency=2)
    assert unjudged == []
    assert [v["better"] for v in verdicts] == ["A"] * 6  # the short answer is always A here
    assert all(v["rating_a"] == 9 and v["rating_b"] == 4 for v in verdicts)
    records = [json.loads(line) for line in open(cache)]
    assert len(records) == len({r["key"] for r in records}) == 6
    assert {r["swapped"] for r in records} == {True, False}  # both orders were shown
    # Transport retries and parse retries are counted apart; replies are what was paid for.
    assert judge.usage["retries"] == len(TRANSPORT_FAULTS)
    assert judge.usage["parse_retries"] == 2
    assert judge.usage["calls"] == 6 + 2 and fake.calls == 6 + 2 + len(TRANSPORT_FAULTS)
    assert judge.usage["prompt_tokens"] == 100 * judge.usage["calls"]
    assert "sk-secret-test" not in repr(judge)
    calls = fake.calls
    again = pairs_lib.judge_pairs(ITEMS, judge, cache)  # all cached: no new calls
    assert again.verdicts == verdicts and fake.calls == calls


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


# --- parse_verdict --------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    json.dumps(VERDICT),  # only the JSON
    "  " + json.dumps(VERDICT) + "\n",
    # an AlpacaEval-style ranking list after the verdict (a greedy {.*} read "Extra data")
    json.dumps(VERDICT) + '\n\n[{"model": "m", "rank": 1}, {"model": "M", "rank": 2}]',
    # prose with braces before and after
    f"Answer A uses {{braces}} wrongly. {json.dumps(VERDICT)} Then {{more}}.",
    # a JSON object without the verdict fields before the real one
    '{"model": "m", "rank": 1} ' + json.dumps(VERDICT),
    '{"analysis": {"A": "wrong"}}\n' + json.dumps(VERDICT) + '\n{"note": 1}',
    "```json\n" + json.dumps(VERDICT, indent=2) + "\n```",
    "Verdict:\n```\n" + json.dumps(VERDICT) + "\n```\nThanks {x}",
    # the verdict nested in another object
    json.dumps({"verdict": VERDICT}),
])
def test_parse_verdict_finds_the_verdict_object(reply):
    assert judge_lib.parse_verdict(reply) == {"better": "B", "rating_a": 3.0, "rating_b": 8.0,
                                              "reason": "B is right"}


def test_parse_verdict_keeps_nested_objects_in_reason():
    reason = {"A": {"errors": ["off by one"]}, "B": {"errors": []}}
    verdict = judge_lib.parse_verdict(json.dumps({**VERDICT, "reason": reason}) + " [1, {2}]")
    assert verdict["better"] == "B" and json.loads(verdict["reason"]) == reason
    braces = judge_lib.parse_verdict(json.dumps({**VERDICT, "reason": "B's {set} is right"}))
    assert braces["reason"] == "B's {set} is right"


def test_parse_verdict_rejects_what_it_cannot_use():
    assert judge_lib.parse_verdict('```json\n{"better": "b", "rating_a": 2, "rating_b": 8}\n```'
                                   )["better"] == "B"
    assert judge_lib.parse_verdict('{"better": "Tie", "rating_a": 5, "rating_b": 5.5}') == {
        "better": "tie", "rating_a": 5.0, "rating_b": 5.5, "reason": ""}
    for bad, why in (("no json", "no JSON object"),
                     ('{"better": "C", "rating_a": 1, "rating_b": 2}', "'better' must be"),
                     ('{"better": "A", "rating_a": 11, "rating_b": 2}', "'rating_a' must be"),
                     ('{"better": "A", "rating_a": true, "rating_b": 2}', "'rating_a' must be"),
                     ('{"better": "A", "rating_a": 9, "rating_b": "8"}', "'rating_b' must be"),
                     ('{"better": "A",', "no complete JSON object"),
                     ('{"better": "A", "rating_a": 9}', "no complete JSON object"),
                     ('[{"model": "m", "rank": 1}]', "no complete JSON object")):
        with pytest.raises(ValueError, match=why):
            judge_lib.parse_verdict(bad)


# --- the judge's failures -------------------------------------------------------------------

def test_a_reply_without_a_verdict_is_asked_once_more_then_unjudged(fake_judge, tmp_path):
    fake, judge = fake_judge(by_prompt={"Question 3?": ["garbage", "garbage"],
                                        "Question 0?": ["empty", "truncated"]})
    verdicts, unjudged = pairs_lib.judge_pairs(ITEMS, judge, str(tmp_path / "c.jsonl"),
                                               concurrency=3)
    assert [v is None for v in verdicts] == [True, False, False, True, False, False]
    assert fake.prompt_calls == {"Question 0?": 2, "Question 1?": 1, "Question 2?": 1,
                                 "Question 3?": 2, "Question 4?": 1, "Question 5?": 1}
    assert [u["index"] for u in unjudged] == [0, 3]
    assert "cut off" in unjudged[0]["problem"] and unjudged[0]["replies"] == 2
    assert unjudged[1]["reply"] == GARBAGE and unjudged[1]["prompt"] == "Question 3?"
    assert judge.usage["parse_retries"] == 2 and judge.usage["retries"] == 0
    assert len(open(tmp_path / "c.jsonl").readlines()) == 4  # unjudged pairs are not cached


def test_an_unreachable_judge_stops_with_a_user_error_and_resumes(fake_judge, tmp_path):
    fake, judge = fake_judge(by_prompt={"Question 5?": ["500"] * 3}, max_attempts=3)
    cache = str(tmp_path / "c.jsonl")
    with pytest.raises(judge_lib.JudgeError, match="unreachable") as caught:
        pairs_lib.judge_pairs(ITEMS, judge, cache, concurrency=1)
    assert isinstance(caught.value, UserError)
    assert "5 of 6 pairs are judged and cached" in str(caught.value)
    assert "the same command resumes" in str(caught.value)
    assert fake.calls == 5 + 3 and judge.usage["retries"] == 2
    _, healthy = fake_judge()
    verdicts, unjudged = pairs_lib.judge_pairs(ITEMS, healthy, cache)
    assert unjudged == [] and None not in verdicts and healthy.usage["calls"] == 1


def test_a_refused_request_is_an_error_at_once(fake_judge, tmp_path):
    fake, judge = fake_judge(["401"])
    with pytest.raises(judge_lib.JudgeError, match=r"refused \(401\)") as caught:
        pairs_lib.judge_pairs(ITEMS, judge, str(tmp_path / "c.jsonl"), concurrency=1)
    assert "0 of 6 pairs" in str(caught.value) and caught.value.hint
    assert fake.calls == 1  # nothing else was sent


def test_a_fatal_error_stops_the_retries_in_flight_at_once(fake_judge, tmp_path):
    """One pair's request waits 30 s to retry a 500 when another's gets a 401: the job stops
    at once, not after the backoff."""
    import time

    fake, judge = fake_judge(by_prompt={ITEMS[0][0]: ["500"] * 5, ITEMS[1][0]: ["401"]},
                             backoff_s=30.0)
    began = time.perf_counter()
    with pytest.raises(judge_lib.JudgeError, match=r"refused \(401\)"):
        pairs_lib.judge_pairs(ITEMS, judge, str(tmp_path / "c.jsonl"), concurrency=2)
    assert time.perf_counter() - began < 10
    assert not judge.stop_event.is_set()  # the judge can be used again


def test_a_request_the_judge_refuses_leaves_that_pair_unjudged_and_the_rest_goes_on(
        fake_judge, tmp_path):
    """A 400 (e.g. a pair over the judge's context) is about one request: asking again gets
    the same answer, so it is not asked again, and it does not stop the other pairs."""
    fake, judge = fake_judge(by_prompt={ITEMS[2][0]: ["400"]})
    result = pairs_lib.judge_pairs(ITEMS, judge, str(tmp_path / "c.jsonl"), concurrency=2)
    assert [v is None for v in result.verdicts] == [False, False, True, False, False, False]
    assert fake.prompt_calls[ITEMS[2][0]] == 1 and fake.calls == 6
    (unjudged,) = result.unjudged
    assert "refused this request (400)" in unjudged["problem"]
    assert "context length" in unjudged["reply"]


# --- the job's files ------------------------------------------------------------------------

PROMPTS = [formats.parse_prompt({"prompt": p}) for p, _, _ in ITEMS]
RESPONSES = [[a for _, a, _ in ITEMS], [b for _, _, b in ITEMS]]


def test_a_judge_that_appends_a_ranking_list_judges_every_pair_once(fake_judge, tmp_path):
    fake, judge = fake_judge(style="trailing_list")
    summary = pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(tmp_path), judge)
    assert (summary["judged"], summary["unjudged"], summary["pairs"]) == (6, 0, 6)
    assert fake.calls == 6 and set(fake.prompt_calls.values()) == {1}
    pairs = formats.read_pairs(summary["pairs_file"]).records
    assert [p.chosen for p in pairs] == RESPONSES[0] and open(summary["unjudged_file"]).read() == ""


def test_an_unjudged_pair_is_listed_and_a_rerun_asks_only_for_it(fake_judge, tmp_path, capsys):
    healthy_dir, out = tmp_path / "healthy", tmp_path / "out"
    _, healthy = fake_judge()
    pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(healthy_dir), healthy)
    fake, judge = fake_judge(style="trailing_list", by_prompt={"Question 3?": ["garbage"] * 2})
    summary = pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(out), judge)
    assert (summary["judged"], summary["unjudged"], summary["pairs"]) == (5, 1, 5)
    assert fake.prompt_calls["Question 3?"] == 2 and fake.calls == 5 + 2
    assert summary["judge_usage_this_run"]["parse_retries"] == 1
    [record] = [json.loads(line) for line in open(out / pairs_lib.UNJUDGED_FILE)]
    assert (record["prompt_index"], record["prompt"], record["reply"]) == (3, "Question 3?",
                                                                            GARBAGE)
    assert "no JSON object" in record["problem"]
    assert "Question 3?" not in open(out / pairs_lib.PAIRS_FILE).read()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"[annotate] 1 pair unjudged (see {out / 'unjudged.jsonl'})")
    # A healthy rerun pays for the unjudged pair only; then the file is the full one.
    fake, judge = fake_judge()
    summary = pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(out), judge)
    assert fake.prompt_calls == {"Question 3?": 1} and summary["unjudged"] == 0
    assert (out / "pairs.jsonl").read_bytes() == (healthy_dir / "pairs.jsonl").read_bytes()
    assert (out / pairs_lib.UNJUDGED_FILE).read_text() == ""


def test_a_killed_job_reruns_to_a_byte_identical_pairs_file(fake_judge, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _, judge = fake_judge(style="prose")
    pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(full), judge)
    killed.mkdir()
    # What kill -9 leaves: three verdicts appended, the fourth cut off mid-line.
    lines = open(full / pairs_lib.CACHE_FILE).readlines()
    (killed / pairs_lib.CACHE_FILE).write_text("".join(lines[:3]) + lines[3][:25])
    fake, judge = fake_judge(style="fenced")
    pairs_lib.annotate_responses(PROMPTS, RESPONSES, str(killed), judge)
    assert fake.calls == 3  # only the pairs not cached
    assert (killed / "pairs.jsonl").read_bytes() == (full / "pairs.jsonl").read_bytes()
    assert len((killed / pairs_lib.CACHE_FILE).read_text().split("\n")) == 6 + 1


class ScriptedPolicyJudge(judge_lib.RuleJudge):
    """Random-weight policies answer gibberish: prefer the shorter one, scored 1-10. The
    prompts in `unusable` get replies without a usable verdict (the pair stays unjudged)."""

    def __init__(self, unusable=()):
        super().__init__()
        self.unusable, self.asked = set(unusable), []

    def compare(self, prompt, a, b):
        self.asked.append(prompt)
        if prompt in self.unusable:
            raise judge_lib.UnusableReply("no JSON object in the judge's answer", GARBAGE, 2)
        better = "A" if len(a) < len(b) else "B" if len(b) < len(a) else "tie"
        return {"better": better, "rating_a": 6.0 if better == "A" else 3.0,
                "rating_b": 6.0 if better == "B" else 3.0, "reason": "length"}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random policy (recording the byte vocabulary) and four suite prompts."""
    root = tmp_path_factory.mktemp("policy")
    cfg = llama.preset("tiny")
    save_params(str(root / "ckpt"), cfg, llama.init_params(cfg, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    suite = synthetic.write_suite(str(root / "data"), seed=0, num_prompts=60)
    prompts = root / "few.jsonl"
    prompts.write_text("".join(open(suite["prompts_test"]).readlines()[:4]))
    return cfg, str(root / "ckpt"), str(prompts)


def annotate(policy, out, judge, overwrite=False, **kwargs):
    """The job as launch runs it (jobs.run), on one device, no vocabulary given."""
    cfg, ckpt, prompts = policy
    kwargs = {"ckpt_dir": ckpt, "max_new_tokens": 12, "batch_size": 4, "temperature": 1.0,
              "partitioner": Partitioner({"data": 1, "fsdp": 1, "tensor": 1}), **kwargs}
    return jobs.run(lambda: pairs_lib.annotate_job(prompts, str(out), cfg, judge, **kwargs),
                    str(out), overwrite=overwrite)


def test_annotate_job_with_the_rule_judge_writes_readable_pairs(policy, tmp_path, capsys):
    out = tmp_path / "out"
    dry = annotate(policy, out, ScriptedPolicyJudge(), dry_run=True)
    assert dry["dry_run"] and "[Answer A]" in capsys.readouterr().out
    assert not (out / SUMMARY_FILE).exists()  # a dry run finishes nothing
    judge = ScriptedPolicyJudge()
    summary = annotate(policy, out, judge)
    pairs = formats.read_pairs(summary["pairs_file"]).records
    assert len(pairs) == summary["pairs"] == summary["judged"] - summary["ties"] > 0
    assert len(judge.asked) == summary["pairs_to_judge"] == summary["judged"]
    assert all(len(p.chosen) <= len(p.rejected) and p.chosen_rating > p.rejected_rating
               for p in pairs)
    # The responses are the generate stages' (seed + k), tokenized with the vocabulary the
    # checkpoint records (none was given).
    for k in range(2):
        responses = load_outputs(str(out / f"responses_{k}"))
        assert {r["generator"] for r in responses} == {f"policy_sample_{k}"}
        recorded = json.load(open(out / f"responses_{k}" / FINGERPRINT_FILE))["fingerprint"]
        assert (recorded["seed"], recorded["vocabulary"]) == (k, ByteVocabulary().fingerprint())
    assert json.load(open(out / FINGERPRINT_FILE))["fingerprint"]["judge"] == {
        "judge": "ScriptedPolicyJudge", "model": "rule-judge-v1"}

    # The same command: skipped, the judge not asked.
    again = ScriptedPolicyJudge()
    assert annotate(policy, out, again) == summary and again.asked == []
    assert "[annotate] already finished" in capsys.readouterr().out
    # Another temperature: refused, naming it; with overwrite, sampled and judged anew.
    with pytest.raises(StageChanged, match=r"temperature: 1\.0 → 0\.7"):
        annotate(policy, out, ScriptedPolicyJudge(), temperature=0.7)
    with pytest.raises(StageChanged, match=r"judge\.judge: \"ScriptedPolicyJudge\" → "
                                           r"\"RuleJudge\""):
        annotate(policy, out, judge_lib.RuleJudge())
    before = load_outputs(str(out / "responses_0"))
    redone_judge = ScriptedPolicyJudge()
    redone = annotate(policy, out, redone_judge, overwrite=True, seed=2)
    assert len(redone_judge.asked) == redone["pairs_to_judge"] == redone["judged"] > 0
    # Sampled anew: responses_0 now holds what responses_0 of seed 2 (seed + 0) draws.
    assert json.load(open(out / "responses_0" / FINGERPRINT_FILE))["fingerprint"]["seed"] == 2
    assert [r["output"] for r in load_outputs(str(out / "responses_0"))] != [
        r["output"] for r in before]


def test_annotate_job_asks_again_for_unjudged_pairs_only(policy, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = formats.read_prompts(policy[2]).records
    bad = prompts[1].text
    first = annotate(policy, out, ScriptedPolicyJudge(unusable=[bad]))
    assert first["unjudged"] == 1 and first["judged"] == first["pairs_to_judge"] - 1
    [record] = [json.loads(line) for line in open(out / pairs_lib.UNJUDGED_FILE)]
    assert (record["prompt_index"], record["reply"]) == (1, GARBAGE)
    assert f"[annotate] 1 pair unjudged (see {out / 'unjudged.jsonl'})" in capsys.readouterr().out
    # The same command asks for that pair only; the stage then holds every pair.
    healthy = ScriptedPolicyJudge()
    second = annotate(policy, out, healthy)
    assert healthy.asked == [bad] and second["unjudged"] == 0
    assert second["pairs"] == first["pairs"] + 1
    assert (out / pairs_lib.UNJUDGED_FILE).read_text() == ""
    assert annotate(policy, out, ScriptedPolicyJudge()) == second  # finished: skipped


def test_annotate_gin_run_dry_run(policy, tmp_path, capsys):
    from xwin_jax import launch

    _, ckpt, prompts = policy
    summary = launch.run_gin_job(["models/tiny.gin", "mesh/single.gin", "runs/annotate.gin"], [
        f"CKPT_DIR = '{ckpt}'", f"PROMPTS = '{prompts}'", f"OUTPUT_DIR = '{tmp_path / 'out'}'",
        "pairs.annotate_job.max_new_tokens = 12", "pairs.annotate_job.batch_size = 4",
        "pairs.annotate_job.partitioner = %PARTITIONER", "pairs.annotate_job.dry_run = True"])
    assert summary["dry_run"] and "Which answer is better" in capsys.readouterr().out
    assert "OPENAI_API_KEY" not in open(tmp_path / "out" / "config.gin").read()


def test_judges_fingerprint_what_decides_their_verdicts(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    base = judge_lib.OpenAIJudge(model="gpt-4")
    same = judge_lib.OpenAIJudge(model="gpt-4", base_url="http://127.0.0.1:1/v1",
                                 api_key="sk-other", timeout_s=5.0, max_attempts=2,
                                 max_parse_retries=3, backoff_s=0.1)
    assert same.fingerprint() == base.fingerprint() == {
        "judge": "OpenAIJudge", "model": "gpt-4", "temperature": 0.0, "max_tokens": 256,
        "prompt": judge_lib.prompt_digest()}
    # The digest every annotate / evaluate stage judged with an OpenAIJudge has recorded since
    # the prompt's version xwin-pair-v1: a new kind of prompt (multi-turn) must not change it.
    assert judge_lib.prompt_digest() == (
        "75597d8c141ca79fc19f0cea77758cccb2112d3625a10a8a2b9a8d2e23359589")
    assert "sk-" not in json.dumps(base.fingerprint())
    for change in ({"model": "gpt-4o"}, {"temperature": 0.5}, {"max_tokens": 512}):
        assert judge_lib.OpenAIJudge(**{"model": "gpt-4", **change}).fingerprint() != (
            base.fingerprint()), change
    before = base.fingerprint()["prompt"]  # another judge prompt is another judge
    monkeypatch.setattr(judge_lib, "JUDGE_TEMPLATE", judge_lib.JUDGE_TEMPLATE + " Be brief.")
    assert base.fingerprint()["prompt"] != before
    assert judge_lib.RuleJudge().fingerprint() == {"judge": "RuleJudge",
                                                  "model": "rule-judge-v1"}
