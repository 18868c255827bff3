"""A small two-turn MT-Bench of verifiable questions, in FastChat's files, and its rule grader:
the offline MT-Bench run (gin/experiments/tiny_mt_bench.gin, evaluate/mt_bench.py).

    write_questions("workdir/synthetic/mt_bench")   # question.jsonl,
                                                    # reference_answer/gpt-4.jsonl
    RuleGrader().grade(question, answers, turn, reference)  # "... Rating: [[N]]"

Turn 1 is a prompt of the synthetic suite (data/synthetic.py: FAMILIES), FastChat's categories
given in turn (CATEGORIES: with two questions a family all eight appear, so the per-category
temperatures and the reference-based prompts for math, reasoning and coding all run);
turn 2 asks for the turn-1 answer again, transformed
("Now write your answer in uppercase."), so it depends on turn 1. Every question records its
`family` and `expected` answers (one a turn), which FastChat's readers carry along; the
reference answers (FastChat's format) state them for the questions of NEED_REF_CATS.

The grader reads those fields (never the prompt text), or the reference answer where it is
given (what the math prompts show the judge), and writes a judgment that ends like GPT-4's:
"Rating: [[N]]", on the synthetic RuleJudge's scale (correct 6-10, shorter is better; wrong
2-3; no answer stated 1).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from xwin_jax import hosts
from xwin_jax.data import formats
from xwin_jax.data.synthetic import FAMILIES, ideal_response, rate_answer, solve, \
    stated_answer
from xwin_jax.errors import ConfigError
from xwin_jax.evaluate.mt_bench_prompts import NEED_REF_CATS, answer_record

VERSION = 2  # bumped whenever write_questions writes something else for the same arguments
# FastChat's eight categories, given to the questions in turn (so two rounds of the suite's
# six families reach all eight; math, reasoning and coding show the judge a reference).
CATEGORIES = ("math", "reasoning", "coding", "writing", "roleplay", "extraction", "stem",
              "humanities")
FOLLOW_UPS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("Now write your answer in uppercase.", str.upper),
    ("Now write your answer backwards.", lambda answer: answer[::-1]),
    ("Now write your answer twice, separated by a space.", lambda answer: f"{answer} {answer}"),
)
REFERENCE_MODEL = "gpt-4"  # FastChat's reference answers are reference_answer/gpt-4.jsonl


def make_questions(seed: int = 0, per_family: int = 2) -> list[dict]:
    """FastChat question records: `per_family` per family, families, categories and
    follow-ups in turn; question_id from 1."""
    if per_family < 1:
        raise ConfigError(f"per_family={per_family}: need at least 1 question a family")
    rng = np.random.default_rng([seed, 7])
    questions, seen = [], set()
    for _round in range(per_family):
        for family in FAMILIES:
            for _ in range(100):  # a family with few distinct prompts: draw again
                prompt = family.make(rng)
                if prompt not in seen:
                    break
            else:
                continue
            seen.add(prompt)
            follow_up, transform = FOLLOW_UPS[len(questions) % len(FOLLOW_UPS)]
            answer = solve(prompt)[1]
            questions.append({"question_id": len(questions) + 1,
                              "category": CATEGORIES[len(questions) % len(CATEGORIES)],
                              "turns": [prompt, follow_up], "family": family.name,
                              "expected": [answer, transform(answer)]})
    return questions


def reference_answers(questions: Sequence[dict]) -> list[dict]:
    """The ideal answers of the questions that need a reference, as FastChat's
    reference_answer/gpt-4.jsonl."""
    return [answer_record(q["question_id"], REFERENCE_MODEL,
                          [ideal_response(a) for a in q["expected"]], 0.0)
            for q in questions if q["category"] in NEED_REF_CATS]


def write_questions(out_dir: str, seed: int = 0, per_family: int = 2) -> dict[str, str]:
    """out_dir/question.jsonl and out_dir/reference_answer/gpt-4.jsonl (FastChat's layout);
    returns their paths. Deterministic in its arguments."""
    questions = make_questions(seed, per_family)
    paths = {"questions": os.path.join(out_dir, "question.jsonl"),
             "references": os.path.join(out_dir, "reference_answer", f"{REFERENCE_MODEL}.jsonl")}
    os.makedirs(os.path.dirname(paths["references"]), exist_ok=True)
    formats.write_jsonl(paths["questions"], questions)
    formats.write_jsonl(paths["references"], reference_answers(questions))
    return paths


def _files(out_dir: str, seed: int, per_family: int) -> dict[str, str]:
    marker = os.path.join(out_dir, f"mt-bench-v{VERSION}-{seed}-{per_family}.done")

    def write_once():
        if not os.path.exists(marker):
            write_questions(out_dir, seed, per_family)
            open(marker, "w").close()

    hosts.leader_first(f"synthetic MT-Bench {marker}", write_once)
    return {"questions": os.path.join(out_dir, "question.jsonl"),
            "references": os.path.join(out_dir, "reference_answer", f"{REFERENCE_MODEL}.jsonl")}


def question_file(out_dir: str, seed: int = 0, per_family: int = 2) -> str:
    """The questions' path, written first if they are not there (what gin binds QUESTIONS
    to for the offline run)."""
    return _files(out_dir, seed, per_family)["questions"]


def reference_file(out_dir: str, seed: int = 0, per_family: int = 2) -> str:
    """The reference answers' path, written first if they are not there."""
    return _files(out_dir, seed, per_family)["references"]


def judgment_text(expected: str, response: str) -> tuple[int, str]:
    """(1-10, why) of a response: the synthetic RuleJudge's rating (synthetic.rate_answer),
    explained as a judge writes it."""
    rating = rate_answer(expected, response)
    if rating.correct:
        verbosity = 10 - rating.score
        return rating.score, ("The answer is correct" + (
            f", but {verbosity} points off for length." if verbosity else " and concise."))
    stated = stated_answer(response)
    if stated is None:
        return rating.score, "The response states no answer."
    return rating.score, f"The answer {stated!r} is wrong (expected {expected!r})."


class RuleGrader:
    """Grades one turn of a synthetic MT-Bench question (free, deterministic), in the shape
    of a GPT-4 judgment. `usage` counts its judgments."""
    model = "rule-grader-v1"

    def __init__(self):
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}

    def grade(self, question: dict, answers: Sequence[str], turn: int,
              reference: Sequence[str] | None = None) -> str:
        """The judgment of answers[turn - 1], ending in "Rating: [[N]]". With a reference
        answer (the math prompts), its stated answer is the expected one."""
        expected = question.get("expected")
        if not isinstance(expected, list) or len(expected) < turn:
            raise ConfigError(f"the rule grader grades only synthetic MT-Bench questions: "
                              f"question {question.get('question_id')!r} has no expected "
                              f"answer for turn {turn}",
                              hint="grade other questions with --gin.JUDGE="
                                   "\"@judge.OpenAIJudge()\"")
        target = expected[turn - 1]
        compared = ""
        if reference is not None:
            target = stated_answer(reference[turn - 1]) or target
            compared = "Compared with the reference answer: "
        self.usage["calls"] += 1
        score, why = judgment_text(target, answers[turn - 1])
        return f"{compared}{why} Rating: [[{score}]]"

    def fingerprint(self) -> dict[str, Any]:
        return {"judge": type(self).__name__, "model": self.model, "version": VERSION}
