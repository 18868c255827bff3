"""MT-Bench as FastChat's llm_judge runs it (single-answer grading), on a checkpoint of ours.

    python -m xwin_jax.launch --gin_file=gin/models/llama2_7b.gin --gin_file=gin/runs/mt_bench.gin \
        --gin.QUESTIONS="'FastChat/fastchat/llm_judge/data/mt_bench/question.jsonl'" \
        --gin.REFERENCE_ANSWERS="'.../mt_bench/reference_answer/gpt-4.jsonl'" \
        --gin.CKPT_DIR="'/runs/x/sft/final'" --gin.MODEL_ID="'xwin-7b-sft'" \
        --gin.OUTPUT_DIR="'/runs/x/mt_bench'"       # OPENAI_API_KEY in the environment

1. Answers: turn 1 of every question, then turn 2 with the model's own turn-1 answer in the
   conversation (the chat template, data/template.py), at FastChat's temperature for the
   question's category (mt_bench_prompts.TEMPERATURE_CONFIG; 0 is greedy). Each (turn,
   temperature) is a generate stage of its own (generate.py: resumable, multi-host) under
   OUTPUT_DIR/answers/, with its prompts file beside it. Answers are stripped, as FastChat
   does; an empty turn-1 answer stands in the turn-2 conversation as EMPTY_ANSWER (a chat
   message cannot be empty), and stays empty in the answer file.
2. OUTPUT_DIR/model_answer/<MODEL_ID>.jsonl in FastChat's format (FastChat names the model
   after the file's stem).
3. Grading: every turn with FastChat's prompt for it (mt_bench_prompts: single-v1,
   single-v1-multi-turn, and the math variants with the reference answer for math, reasoning
   and coding), the prompt's system_prompt as system message, the judge at temperature 0 and
   2048 tokens, the rating read with FastChat's [[N]] / [N] patterns. The judge is an
   OpenAIJudge (annotate/judge.py: its retries, concurrency, JudgeError) or a grader with
   `grade(question, answers, turn, reference) -> judgment text` (data/synthetic_mt_bench.py:
   RuleGrader, for the synthetic questions). Every judgment is appended (fsynced) to
   OUTPUT_DIR/judge_cache.jsonl, keyed by the judge model, the prompt's name and the rendered
   system and user messages (annotate/cached_calls.py): a killed run pays no judgment twice.
4. OUTPUT_DIR/model_judgment/<judge model>_single.jsonl, FastChat's judgment lines (what its
   show_result.py reads), and summary.json: mean turn-1, turn-2 and overall scores, by
   category too, judgments with score -1 left out as FastChat leaves them out.

A turn whose replies held no rating (asked again once, OpenAIJudge.max_parse_retries) is
written with score -1, as FastChat writes it, but not cached: it is listed in
OUTPUT_DIR/unjudged.jsonl, summary.json says `incomplete`, and the same command asks the judge
again for those turns only.

OUTPUT_DIR is the 'mt_bench' stage (train/stage.py): its fingerprint is the questions', the
reference answers' and the judge prompts' contents, the checkpoint, the vocabulary, the model
id, the generation settings and the judge (its model; a grader's own fingerprint). A rerun of
a finished run skips it; one with other settings is refused naming them. On N hosts every
host generates, host 0 alone judges and writes (annotate/pairs.py: on_host_zero).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from xwin_jax import fingerprint
from xwin_jax.annotate.cached_calls import judge_cached
from xwin_jax.annotate.judge import UnusableReply
from xwin_jax.annotate.pairs import HOST_ZERO_FILE, UNJUDGED_FILE, excerpt, on_host_zero, \
    unjudged_line, write_unjudged
from xwin_jax.data import formats
from xwin_jax.decoding import DecodeLayout
from xwin_jax.errors import ConfigError, UserError
from xwin_jax.evaluate import mt_bench_prompts as fc
from xwin_jax.generate import generate_job, load_outputs
from xwin_jax.models.config import LlamaConfig
from xwin_jax.partitioning import Partitioner, sync_hosts
from xwin_jax.redaction import redact_text
from xwin_jax.train.sharded import Start
from xwin_jax.train.stage import run_stage

CACHE_FILE = "judge_cache.jsonl"
ANSWERS_DIR = "answers"
EMPTY_ANSWER = "(no answer)"
JUDGE_KEY_VERSION = "mt-bench-single-v1"  # bumped if what a cached judgment means changes


def stage_dir(workdir: str, name: str = "mt_bench") -> str:
    """WORKDIR/<name> (for gin files that chain stages)."""
    return os.path.join(workdir, name)


# --- answers ------------------------------------------------------------------------------

def conversation(question: dict, answers: Sequence[str]) -> list[dict]:
    """The chat messages of the question's next turn: its earlier turns with the model's
    own answers, then the turn to answer."""
    messages = []
    for turn, answer in enumerate(answers):
        messages += [{"role": "user", "content": question["turns"][turn]},
                     {"role": "assistant", "content": answer or EMPTY_ANSWER}]
    return messages + [{"role": "user", "content": question["turns"][len(answers)]}]


def turn_groups(questions: Sequence[dict], turn: int) -> dict[float, list[int]]:
    """The indices of the questions that have `turn`, by their sampling temperature."""
    groups: dict[float, list[int]] = {}
    for i, question in enumerate(questions):
        if len(question["turns"]) >= turn:
            groups.setdefault(fc.temperature_for(question["category"]), []).append(i)
    return dict(sorted(groups.items()))


def answer_questions(directory: str, questions: Sequence[dict], model: LlamaConfig, *,
                     ckpt_dir: str, vocabulary: Any, model_id: str, **generate_options
                     ) -> list[list[str]]:
    """The model's answers, turn by turn: a generate stage per (turn, temperature) under
    `directory` (resumable), each with its prompts file. Runs on every host."""
    answers: list[list[str]] = [[] for _ in questions]
    seed = generate_options.pop("seed")
    for turn in (1, 2):
        for temperature, indices in turn_groups(questions, turn).items():
            name = f"turn{turn}_t{temperature:g}"
            prompts_path = os.path.join(directory, f"{name}.prompts.jsonl")
            if jax.process_index() == 0:  # host 0 writes, every host reads it after the barrier
                os.makedirs(directory, exist_ok=True)
                formats.write_jsonl(prompts_path, [
                    {"prompt": conversation(questions[i], answers[i]),
                     "question_id": questions[i]["question_id"]} for i in indices])
            sync_hosts(f"mt_bench: {name} prompts written")
            stage = os.path.join(directory, name)
            # Rows of each stage are keyed by their position (generate.py), so each stage
            # samples from its own seed: turn 2 does not reuse turn 1's random stream.
            generate_job(prompts_path, stage, model, ckpt_dir=ckpt_dir, vocabulary=vocabulary,
                         generator=model_id, temperature=temperature,
                         seed=stage_seed(seed, name), **generate_options)
            for i, output in zip(indices, load_outputs(stage)):
                answers[i].append(output["output"].strip())  # as FastChat's answers
    return answers


def stage_seed(seed: int, name: str) -> int:
    """The generate seed of one (turn, temperature) stage: `seed` mixed with the stage's
    name, so no two stages share keys."""
    return int(hashlib.sha256(f"{seed}/{name}".encode()).hexdigest()[:8], 16)


# --- grading ------------------------------------------------------------------------------

def grading_items(questions: Sequence[dict], answers: Sequence[Sequence[str]],
                  references: dict, prompts: dict[str, dict]) -> list[dict]:
    """One item per (question, turn), turn 1 of every question first: the prompt FastChat
    uses for it, rendered."""
    items = []
    for turn in (1, 2):
        for i, question in enumerate(questions):
            if len(question["turns"]) < turn:
                continue
            name = fc.prompt_name(question["category"], turn)
            reference = references.get(question["question_id"]) \
                if fc.needs_reference(question["category"]) else None
            system, user = fc.render(prompts[name], question, list(answers[i]), turn, reference)
            items.append({"index": i, "turn": turn, "prompt_name": name, "system": system,
                          "user_prompt": user, "reference": reference})
    return items


def judgment_key(judge_model: str, item: dict) -> str:
    payload = [judge_model, item["prompt_name"], item["system"], item["user_prompt"],
               JUDGE_KEY_VERSION]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _rated(judgment: str) -> str:
    """`judgment` if it holds a rating (for OpenAIJudge.ask), else ValueError."""
    if fc.parse_rating(judgment) == fc.NO_RATING:
        raise ValueError("no rating in the judge's answer (neither [[N]] nor [N])")
    return judgment


def judge_turn(judge: Any, item: dict, question: dict, answers: Sequence[str]) -> str:
    """The judge's judgment text on one item; UnusableReply when it holds no rating."""
    if hasattr(judge, "grade"):
        judgment = judge.grade(question, list(answers), item["turn"], item["reference"])
        if fc.parse_rating(judgment) == fc.NO_RATING:
            raise UnusableReply("no rating in the grader's judgment", judgment, 1)
        return judgment
    messages = [{"role": "system", "content": item["system"]},
                {"role": "user", "content": item["user_prompt"]}]
    return judge.ask(messages, _rated, max_tokens=fc.JUDGE_MAX_TOKENS,
                     temperature=fc.JUDGE_TEMPERATURE)


def grade(questions: Sequence[dict], answers: Sequence[Sequence[str]], items: list[dict],
          judge: Any, model_id: str, directory: str, concurrency: int = 8) -> list[dict]:
    """Judges every item (cached in directory/judge_cache.jsonl); writes the judgment file
    and unjudged.jsonl; returns per item {question_id, category, turn, score}. Calls the
    judge and writes: host 0 only (on_host_zero)."""
    os.makedirs(os.path.join(directory, "model_judgment"), exist_ok=True)
    keys = [judgment_key(judge.model, item) for item in items]

    def judge_one(n: int) -> dict:
        item = items[n]
        judgment = judge_turn(judge, item, questions[item["index"]], answers[item["index"]])
        # What the judge wrote is stored as launch prints it (no echoed credential).
        return {"judgment": redact_text(judgment), "score": fc.parse_rating(judgment),
                "tstamp": time.time()}

    done = judge_cached(keys, judge_one, os.path.join(directory, CACHE_FILE),
                        concurrency=concurrency, stop_event=getattr(judge, "stop_event", None),
                        what="turns")
    first_of = {}  # items with the same key share the first one's unusable reply
    for n, key in enumerate(keys):
        first_of.setdefault(key, n)
    lines, unjudged, scores = [], [], []
    for n, (item, record) in enumerate(zip(items, done.records)):
        question = questions[item["index"]]
        if record is None:  # unjudged: FastChat's -1, not cached
            err = done.unusable[first_of[keys[n]]]
            record = {"judgment": redact_text(err.reply), "score": fc.NO_RATING,
                      "tstamp": time.time()}
            unjudged.append({"question_id": question["question_id"], "turn": item["turn"],
                             "key": keys[n], "question": excerpt(question["turns"][0]),
                             "problem": redact_text(err.problem), "replies": err.replies,
                             "reply": excerpt(record["judgment"])})
        lines.append({"question_id": question["question_id"], "model": model_id,
                      "judge": [judge.model, item["prompt_name"]],
                      "user_prompt": item["user_prompt"], "judgment": record["judgment"],
                      "score": record["score"], "turn": item["turn"],
                      "tstamp": record["tstamp"]})
        scores.append({"question_id": question["question_id"],
                       "category": question["category"], "turn": item["turn"],
                       "score": record["score"]})
    path = judgment_path(directory, judge.model)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # a judge named 'openai/gpt-4o' too
    formats.write_jsonl(path, lines)
    write_unjudged(os.path.join(directory, UNJUDGED_FILE), unjudged)
    return scores


def judgment_path(directory: str, judge_model: str) -> str:
    return os.path.join(directory, "model_judgment", f"{judge_model}_single.jsonl")


def answer_path(directory: str, model_id: str) -> str:
    return os.path.join(directory, "model_answer", f"{model_id}.jsonl")


def mean_scores(scores: Sequence[dict]) -> dict:
    """turn_1, turn_2 and overall means (None where there is none), -1 left out as FastChat's
    show_result.py leaves it out; overall pools both turns' judgments, as FastChat does."""
    def mean(values):
        return float(np.mean(values)) if values else None
    rated = [s for s in scores if s["score"] != fc.NO_RATING]
    return {"turn_1": mean([s["score"] for s in rated if s["turn"] == 1]),
            "turn_2": mean([s["score"] for s in rated if s["turn"] == 2]),
            "overall": mean([s["score"] for s in rated])}


def summarize(scores: Sequence[dict]) -> dict:
    categories = sorted({s["category"] for s in scores})
    return {**mean_scores(scores),
            "by_category": {c: mean_scores([s for s in scores if s["category"] == c])
                            for c in categories},
            "n_judgments": len(scores),
            "n_unjudged": sum(s["score"] == fc.NO_RATING for s in scores)}


def judge_identity(judge: Any) -> dict:
    """What decides the judgments beside the prompts: a grader's own fingerprint, or an
    OpenAI-compatible judge's model (its sampling is FastChat's, fixed here)."""
    if hasattr(judge, "grade"):
        return judge.fingerprint()
    if not hasattr(judge, "ask"):
        raise ConfigError(f"JUDGE: a {type(judge).__name__} cannot grade MT-Bench answers",
                          hint="use --gin.JUDGE=\"@judge.OpenAIJudge()\", or for the synthetic "
                               "questions @synthetic_mt_bench.RuleGrader()")
    return {"judge": type(judge).__name__, "model": judge.model,
            "temperature": fc.JUDGE_TEMPERATURE, "max_tokens": fc.JUDGE_MAX_TOKENS}


def _check_references(questions: Sequence[dict], references: dict, path: str | None) -> None:
    missing = [q["question_id"] for q in questions if fc.needs_reference(q["category"])
               and (q["question_id"] not in references
                    or len(references[q["question_id"]]) < len(q["turns"]))]
    if missing:
        raise ConfigError(
            f"{len(missing)} questions of the categories {', '.join(fc.NEED_REF_CATS)} have no "
            f"reference answer (for every turn) in {path or 'REFERENCE_ANSWERS (not given)'}, "
            f"e.g. question_id {missing[0]!r}",
            hint="give REFERENCE_ANSWERS (FastChat's data/mt_bench/reference_answer/gpt-4.jsonl)")


def mt_bench_job(questions: str, output_dir: str, model: LlamaConfig, judge: Any, *,
                 ckpt_dir: str, model_id: str, reference_answers: str | None = None,
                 judge_prompts: str | None = None, vocabulary: Any = None,
                 max_new_tokens: int = 1024, max_prompt_len: int = 2048,
                 system: str | None = None, batch_size: int = 16, seed: int = 0,
                 concurrency: int = 8, partitioner: Partitioner | None = None,
                 decode_layout: DecodeLayout | None = None) -> dict:
    """Answers QUESTIONS with the model in `ckpt_dir` and grades the answers as FastChat's
    single-answer MT-Bench into OUTPUT_DIR, the 'mt_bench' stage (see the module docstring).
    `reference_answers` is needed when there are math, reasoning or coding questions;
    `judge_prompts` (a FastChat judge_prompts.jsonl) replaces the built-in copy of
    FastChat's prompts. Returns the summary."""
    if not model_id or "/" in model_id:
        raise ConfigError(f"MODEL_ID={model_id!r}: give a name without '/' (FastChat reads "
                          f"the model's name from model_answer/<MODEL_ID>.jsonl)")
    question_records = fc.read_questions(questions)
    references = fc.read_answers(reference_answers) if reference_answers else {}
    _check_references(question_records, references, reference_answers)
    prompts = fc.load_judge_prompts(judge_prompts) if judge_prompts else fc.JUDGE_PROMPTS
    start = Start.policy(model, ckpt_dir, vocabulary, what="CKPT_DIR")
    generate_options = dict(max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len,
                            system=system, seed=seed)
    settings = {"questions": fingerprint.file_identity(questions),
                "reference_answers": reference_answers
                and fingerprint.file_identity(reference_answers),
                "judge_prompts": prompts, "checkpoint": start.checkpoint,
                "model": start.config, "vocabulary": start.vocabulary, "model_id": model_id,
                **generate_options, "judge": judge_identity(judge)}

    def body(directory: str) -> dict:
        answers = answer_questions(
            os.path.join(directory, ANSWERS_DIR), question_records, model, ckpt_dir=ckpt_dir,
            vocabulary=start.vocabulary, model_id=model_id, batch_size=batch_size,
            partitioner=partitioner, decode_layout=decode_layout, **generate_options)
        answers_file = answer_path(directory, model_id)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(answers_file), exist_ok=True)
            now = time.time()
            formats.write_jsonl(answers_file, [
                fc.answer_record(q["question_id"], model_id, a, now)
                for q, a in zip(question_records, answers)])
        items = grading_items(question_records, answers, references, prompts)
        scores = on_host_zero(os.path.join(directory, HOST_ZERO_FILE), lambda: grade(
            question_records, answers, items, judge, model_id, directory, concurrency))
        return _report(directory, model_id, judge.model, scores, answers_file)

    return run_stage(output_dir, "mt_bench", settings, body)


def _report(directory: str, model_id: str, judge_model: str, scores: list[dict],
            answers_file: str) -> dict:
    results = summarize(scores)
    unjudged_path = os.path.join(directory, UNJUDGED_FILE)
    if results["n_unjudged"] == results["n_judgments"]:
        raise UserError(f"no turn could be judged: the judge's replies for all "
                        f"{results['n_judgments']} turns held no rating (see {unjudged_path})",
                        hint="read the replies there: the judge must rate with \"[[N]]\"; the "
                             "same command asks again for these only")
    summary = {"model_id": model_id, "judge": judge_model, **results,
               "answer_file": answers_file,
               "judgment_file": judgment_path(directory, judge_model),
               "unjudged_file": unjudged_path}
    if jax.process_index() == 0:
        def show(value):
            return "-" if value is None else f"{value:.2f}"
        print(f"[mt_bench] {model_id}: turn 1 {show(results['turn_1'])}, turn 2 "
              f"{show(results['turn_2'])}, overall {show(results['overall'])} "
              f"({results['n_judgments']} judgments by {judge_model}) → {directory}")
        if results["n_unjudged"]:
            print(unjudged_line("mt_bench", results["n_unjudged"], "turn", unjudged_path))
    if results["n_unjudged"]:  # the same command asks the judge again, for these only
        summary["incomplete"] = f"{results['n_unjudged']} turns unjudged"
    return summary
