"""MT-Bench compatible with FastChat's llm_judge: our files read back with FastChat's own code
(fschat 0.2.36), its rating patterns, per-category temperatures, turn 2 conditioned on the
model's turn-1 answer, the reference-based prompts, resumable cached judging, and an
OpenAI-compatible judge that gets FastChat's system prompt and max_tokens."""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import threading

import jax
import pytest

from conftest import serve_on_loopback
from xwin_jax import jobs
from xwin_jax.annotate import judge as judge_lib
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import synthetic_mt_bench
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.evaluate import mt_bench
from xwin_jax.evaluate import mt_bench_prompts as prompts_lib
from xwin_jax.models import llama
from xwin_jax.partitioning import Partitioner

fastchat_common = pytest.importorskip("fastchat.llm_judge.common")
show_result = pytest.importorskip("fastchat.llm_judge.show_result")

CFG = llama.preset("tiny")
SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}
# FastChat's data/judge_prompts.jsonl, its four single-answer lines as the file has them
# (lm-sys/FastChat 0e6d3e4), not built from our copy.
FASTCHAT_JUDGE_PROMPTS = r"""{"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.", "prompt_template": "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]", "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"}
{"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.", "prompt_template": "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]", "description": "Prompt for general questions", "category": "math", "output_format": "[[rating]]"}
{"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the assistant's answer to the second user question. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n", "prompt_template": "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's Conversation with User|>", "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"}
{"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question. Your evaluation should consider correctness and helpfulness. You will be given a reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the second question. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n", "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's Conversation with User|>", "description": "Prompt for general questions", "category": "math", "output_format": "[[rating]]"}
"""  # noqa: E501


class CountingGrader(synthetic_mt_bench.RuleGrader):
    """The rule grader, counting its calls; `fail_after` calls it raises (a kill)."""

    def __init__(self, fail_after=None, unrated=()):
        super().__init__()
        self.fail_after, self.unrated, self.calls = fail_after, set(unrated), 0
        self.lock = threading.Lock()

    def grade(self, question, answers, turn, reference=None):
        with self.lock:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise KeyboardInterrupt
        if (question["question_id"], turn) in self.unrated:
            return "I cannot rate this one."
        return super().grade(question, answers, turn, reference)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The synthetic questions, a tiny random checkpoint, FastChat's judge prompts file, and
    one run of the job with the rule grader."""
    root = tmp_path_factory.mktemp("mt_bench")
    files = synthetic_mt_bench.write_questions(str(root / "data"), per_family=2)
    ckpt = str(root / "ckpt")
    save_params(ckpt, CFG, llama.init_params(CFG, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    judge_prompts = root / "judge_prompts.jsonl"
    judge_prompts.write_text(FASTCHAT_JUDGE_PROMPTS)
    grader = CountingGrader()
    out = root / "out"
    summary = run_job(files, ckpt, out, grader, judge_prompts=str(judge_prompts))
    return {"files": files, "ckpt": ckpt, "out": out, "summary": summary, "grader": grader,
            "judge_prompts": str(judge_prompts)}


def run_job(files, ckpt, out, judge, **kwargs):
    options = dict(max_new_tokens=5, max_prompt_len=448, batch_size=4,
                   partitioner=Partitioner(SINGLE))
    return jobs.run(lambda: mt_bench.mt_bench_job(
        files["questions"], str(out), CFG, judge, ckpt_dir=ckpt, model_id="tiny-random",
        reference_answers=files["references"], **{**options, **kwargs}), str(out))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# --- the files, read by FastChat's own code ------------------------------------------------

def test_fastchat_reads_our_answers_and_judgments(bench):
    out, files = bench["out"], bench["files"]
    questions = fastchat_common.load_questions(files["questions"], None, None)
    answers = fastchat_common.load_model_answers(str(out / "model_answer"))
    references = fastchat_common.load_model_answers(os.path.dirname(files["references"]))
    assert list(answers) == ["tiny-random"] and list(references) == ["gpt-4"]
    assert sorted(answers["tiny-random"]) == [q["question_id"] for q in questions]
    assert set(references["gpt-4"]) == {q["question_id"] for q in questions
                                        if q["category"] in fastchat_common.NEED_REF_CATS}
    for answer in answers["tiny-random"].values():
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert len(answer["choices"][0]["turns"]) == 2
    judge_prompts = fastchat_common.load_judge_prompts(bench["judge_prompts"])
    assert {n: judge_prompts[n] for n in prompts_lib.JUDGE_PROMPTS} == prompts_lib.JUDGE_PROMPTS
    judgments = read_jsonl(out / "model_judgment" / "rule-grader-v1_single.jsonl")
    assert len(judgments) == 2 * len(questions)
    # Every judgment's user prompt is the one FastChat's run_judge_single formats.
    by_id = {q["question_id"]: q for q in questions}
    for record in judgments:
        question = by_id[record["question_id"]]
        name = record["judge"][1]
        judge = fastchat_common.Judge("gpt-4", judge_prompts[name])
        ref = references["gpt-4"].get(record["question_id"])
        kwargs = {}
        if ref is not None:
            kwargs["ref_answer_1"] = ref["choices"][0]["turns"][0]
            if record["turn"] == 2:
                kwargs["ref_answer_2"] = ref["choices"][0]["turns"][1]
        turns = answers["tiny-random"][record["question_id"]]["choices"][0]["turns"]
        if record["turn"] == 2:
            expected = judge.prompt_template["prompt_template"].format(
                question_1=question["turns"][0], question_2=question["turns"][1],
                answer_1=turns[0], answer_2=turns[1], **kwargs)
        else:
            expected = judge.prompt_template["prompt_template"].format(
                question=question["turns"][0], answer=turns[0], **kwargs)
        assert record["user_prompt"] == expected
        needs_ref = question["category"] in fastchat_common.NEED_REF_CATS
        assert name == ("single-math-v1" if needs_ref else "single-v1") + (
            "-multi-turn" if record["turn"] == 2 else "")
        assert record["model"] == "tiny-random" and record["judge"][0] == "rule-grader-v1"


def test_show_result_prints_the_summary_means(bench):
    out, summary = bench["out"], bench["summary"]
    path = out / "model_judgment" / "rule-grader-v1_single.jsonl"
    args = argparse.Namespace(input_file=str(path), model_list=None, bench_name="mt_bench",
                              judge_model="rule-grader-v1")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        show_result.display_result_single(args)
    text = printed.getvalue()
    first, second, average = re.findall(r"tiny-random(?:\s+\d)?\s+([\d.]+)\n", text)
    scores = [r["score"] for r in read_jsonl(path)]
    turn_1 = [r["score"] for r in read_jsonl(path) if r["turn"] == 1]
    assert float(first) == pytest.approx(sum(turn_1) / len(turn_1), abs=1e-3)
    assert float(first) == pytest.approx(summary["turn_1"], abs=1e-3)
    assert float(second) == pytest.approx(summary["turn_2"], abs=1e-3)
    assert float(average) == pytest.approx(sum(scores) / len(scores), abs=1e-3)
    assert summary["overall"] == pytest.approx(sum(scores) / len(scores))
    assert summary["n_judgments"] == len(scores) and summary["n_unjudged"] == 0
    assert set(summary["by_category"]) == {"math", "coding", "reasoning", "writing", "roleplay",
                                           "extraction", "stem", "humanities"}


# --- generation ----------------------------------------------------------------------------

def test_temperatures_by_category_and_turn_two_sees_turn_one(bench):
    out = bench["out"]
    questions = {q["question_id"]: q for q in read_jsonl(bench["files"]["questions"])}
    answers = {a["question_id"]: a["choices"][0]["turns"]
               for a in read_jsonl(out / "model_answer" / "tiny-random.jsonl")}
    seen = set()
    for turn in (1, 2):
        for temperature in (0.0, 0.1, 0.7):
            stage = out / "answers" / f"turn{turn}_t{temperature:g}"
            fingerprint = json.load(open(stage / "fingerprint.json"))["fingerprint"]
            assert fingerprint["temperature"] == temperature
            prompts = read_jsonl(str(stage) + ".prompts.jsonl")
            for record in prompts:
                qid = record["question_id"]
                category = questions[qid]["category"]
                assert fastchat_common.temperature_config[category] == temperature
                seen.add((qid, turn))
                if turn == 2:  # the conversation holds the model's own turn-1 answer
                    assert [m["role"] for m in record["prompt"]] == ["user", "assistant",
                                                                     "user"]
                    assert record["prompt"][1]["content"] == (answers[qid][0]
                                                              or mt_bench.EMPTY_ANSWER)
                    assert record["prompt"][2]["content"] == questions[qid]["turns"][1]
            outputs = read_jsonl(stage / "outputs.jsonl")
            for output in outputs:
                qid = prompts[output["index"]]["question_id"]
                assert answers[qid][turn - 1] == output["output"].strip()
    assert seen == {(q, t) for q in questions for t in (1, 2)}


def test_sampling_at_temperature_zero_is_greedy():
    import jax.numpy as jnp

    from xwin_jax import sampling
    logits = jax.random.normal(jax.random.key(1), (4, 37))
    keys = jax.random.split(jax.random.key(2), 4)
    token, _ = sampling.sample_token(logits, keys, 0.0)
    assert (token == jnp.argmax(logits, -1)).all()


# --- rating and prompts ----------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Good. Rating: [[7]]", "Rating: [[8.5]] and later [[2]]", "no double, but [6] here",
    "[[10]]", "Rating: [ [5] ]", "nothing at all", "Rating: 7", "[[seven]]", "[3.] ok",
])
def test_rating_parsed_as_fastchat_parses_it(text):
    match = re.search(fastchat_common.one_score_pattern, text) or re.search(
        fastchat_common.one_score_pattern_backup, text)
    import ast
    expected = ast.literal_eval(match.groups()[0]) if match else -1
    assert prompts_lib.parse_rating(text) == expected
    assert type(prompts_lib.parse_rating(text)) is type(expected)


def test_a_zero_padded_rating_is_read_not_fatal():
    """FastChat's literal_eval raises SyntaxError on "07"; a temperature-0 judge would repeat
    the reply on every rerun, so the number is read as the number it is."""
    assert prompts_lib.parse_rating("Rating: [[07]]") == 7
    assert prompts_lib.parse_rating("see arr[01] in the code") == 1
    assert prompts_lib.parse_rating("Rating: [[08.50]]") == 8.5


def test_math_questions_are_graded_against_the_reference():
    question = {"question_id": 1, "category": "math", "turns": ["What is 2 + 2?", "Uppercase."],
                "expected": ["4", "4"]}
    grader = synthetic_mt_bench.RuleGrader()
    answers = ["The answer is 4.", "The answer is 4."]
    assert grader.grade(question, answers, 1).endswith("[[10]]")
    wrong_reference = ["The answer is 5.", "The answer is 5."]  # the grader follows it
    graded = grader.grade(question, answers, 1, wrong_reference)
    assert graded.startswith("Compared with the reference") and graded.endswith("[[3]]")
    items = mt_bench.grading_items([question], [answers], {1: wrong_reference},
                                   prompts_lib.JUDGE_PROMPTS)
    assert [i["prompt_name"] for i in items] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert "[The Start of Reference Answer]\nThe answer is 5.\n" in items[0]["user_prompt"]
    assert "### Reference answer:\nThe answer is 5.\n\n### User:\nUppercase." in \
        items[1]["user_prompt"]
    with pytest.raises(Exception, match="no reference answer"):
        mt_bench._check_references([question], {}, None)


# --- judging: resumable, cached, OpenAI-compatible -------------------------------------------

def grading_inputs(bench):
    questions = prompts_lib.read_questions(bench["files"]["questions"])
    references = prompts_lib.read_answers(bench["files"]["references"])
    answers = [[f"The answer is {q['expected'][0]}.", "The answer is nothing."]
               for q in questions]
    items = mt_bench.grading_items(questions, answers, references, prompts_lib.JUDGE_PROMPTS)
    return questions, answers, items


def test_a_killed_grading_resumes_without_asking_again(bench, tmp_path):
    questions, answers, items = grading_inputs(bench)
    killed = CountingGrader(fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        mt_bench.grade(questions, answers, items, killed, "m", str(tmp_path), concurrency=1)
    cached = len(read_jsonl(tmp_path / mt_bench.CACHE_FILE))
    assert cached == 7
    resumed = CountingGrader()
    scores = mt_bench.grade(questions, answers, items, resumed, "m", str(tmp_path))
    assert resumed.calls == len(items) - 7
    fresh = CountingGrader()
    expected = mt_bench.grade(questions, answers, items, fresh, "m", str(tmp_path / "fresh"))
    assert [s["score"] for s in scores] == [s["score"] for s in expected]
    assert {s["score"] for s in scores if s["turn"] == 1} == {10}
    again = CountingGrader()
    mt_bench.grade(questions, answers, items, again, "m", str(tmp_path))
    assert again.calls == 0


def test_an_unrated_turn_scores_minus_one_and_a_rerun_asks_again(bench, tmp_path):
    first_id = 1
    grader = CountingGrader(unrated={(first_id, 2)})
    out = tmp_path / "out"
    # The answers of the module's run: its generate stages are finished, so they are skipped.
    shutil.copytree(bench["out"] / mt_bench.ANSWERS_DIR, out / mt_bench.ANSWERS_DIR)
    summary = run_job(bench["files"], bench["ckpt"], out, grader)
    assert summary["incomplete"] == "1 turns unjudged" and summary["n_unjudged"] == 1
    judgments = read_jsonl(out / "model_judgment" / "rule-grader-v1_single.jsonl")
    (minus_one,) = [r for r in judgments if r["score"] == -1]
    assert (minus_one["question_id"], minus_one["turn"]) == (first_id, 2)
    assert minus_one["judgment"] == "I cannot rate this one."
    (listed,) = read_jsonl(out / "unjudged.jsonl")
    assert (listed["question_id"], listed["turn"]) == (first_id, 2)
    # -1 is left out of the means, as FastChat's show_result.py leaves it out.
    rated = [r["score"] for r in judgments if r["turn"] == 2 and r["score"] != -1]
    assert summary["turn_2"] == pytest.approx(sum(rated) / len(rated))
    healthy = CountingGrader()
    resumed = run_job(bench["files"], bench["ckpt"], out, healthy)
    assert healthy.calls == 1 and "incomplete" not in resumed and resumed["n_unjudged"] == 0
    assert resumed["turn_1"] == summary["turn_1"]
    assert bench["grader"].calls == bench["summary"]["n_judgments"]
    finished = CountingGrader()
    assert run_job(bench["files"], bench["ckpt"], out, finished)["n_unjudged"] == 0
    assert finished.calls == 0  # a finished stage is skipped


class FakeOpenAI:
    """An OpenAI-compatible chat endpoint that rates every answer 6 ("[[6]]"), except a
    scripted garbage reply for the requests whose user message contains `garbage_for`."""

    def __init__(self, garbage_for=None):
        self.bodies, self.garbage_for = [], garbage_for
        self.lock = threading.Lock()

    def app(self):
        import fastapi
        app = fastapi.FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            with self.lock:
                self.bodies.append(body)
            user = body["messages"][-1]["content"]
            content = "Fine. Rating: [[6]]"
            if self.garbage_for and self.garbage_for in user:
                content = "I would rather not say. Key sk-secret-test"
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}}
        return app


def test_an_openai_judge_gets_fastchats_messages_and_max_tokens(bench, tmp_path):
    questions, answers, items = grading_inputs(bench)
    fake = FakeOpenAI(garbage_for=questions[2]["turns"][0])
    server, port = serve_on_loopback(fake.app())
    try:
        judge = judge_lib.OpenAIJudge(model="gpt-4", base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key="sk-secret-test", timeout_s=5.0, backoff_s=0.01)
        scores = mt_bench.grade(questions, answers, items, judge, "m", str(tmp_path),
                                concurrency=4)
    finally:
        server.should_exit = True
    # questions[2]'s two turns: asked twice each (one parse retry), then -1.
    assert len(fake.bodies) == len(items) + 2 and judge.usage["parse_retries"] == 2
    by_user = {b["messages"][1]["content"]: b for b in fake.bodies}
    for item in items:
        body = by_user[item["user_prompt"]]
        assert body["max_tokens"] == 2048 and body["temperature"] == 0
        assert body["model"] == "gpt-4"
        assert body["messages"][0] == {"role": "system", "content": prompts_lib.JUDGE_PROMPTS[
            item["prompt_name"]]["system_prompt"]}
    assert [s["score"] for s in scores] == [
        -1 if s["question_id"] == questions[2]["question_id"] else 6 for s in scores]
    judgments = read_jsonl(tmp_path / "model_judgment" / "gpt-4_single.jsonl")
    assert all("sk-secret-test" not in r["judgment"] for r in judgments)
    assert len(read_jsonl(tmp_path / "unjudged.jsonl")) == 2
