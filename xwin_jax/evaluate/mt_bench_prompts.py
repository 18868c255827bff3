"""MT-Bench's files and judge prompts, as FastChat's llm_judge (fschat 0.2.36,
fastchat/llm_judge/common.py, gen_judgment.py, data/judge_prompts.jsonl) has them.

    question.jsonl              {"question_id", "category", "turns": [t1, t2]}
    reference_answer/gpt-4.jsonl and model_answer/<MODEL>.jsonl
                                {"question_id", "answer_id", "model_id",
                                 "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}
    judge_prompts.jsonl         {"name", "type", "system_prompt", "prompt_template",
                                 "output_format", ...}

Single-answer grading: turn 1 with `single-v1`, turn 2 with `single-v1-multi-turn` (the whole
conversation, the judge told to grade the second answer); questions of NEED_REF_CATS with the
`single-math-v1` variants, which also show the reference answer. The prompt's system_prompt is
the system message; the judge answers at temperature 0 with at most 2048 tokens; its rating
is the first `[[N]]`, else the first `[N]`, else -1 (FastChat's `one_score_pattern` and
`one_score_pattern_backup`). The four prompts below are FastChat's, verbatim, so the project
grades the same way without a FastChat checkout; JUDGE_PROMPTS replaces them from a file.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from typing import Any

from xwin_jax.data.formats import DataFormatError, iter_json_records

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
# FastChat's gen_model_answer.py: sampling temperature by category (0 = greedy); a category
# it does not list samples at 0.7.
TEMPERATURE_CONFIG = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                      "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1,
                      "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
NO_RATING = -1

_FORMAT_RULE = ('After providing your explanation, you must rate the response on a scale of 1 '
                'to 10 by strictly following this format: "[[rating]]", for example: "Rating: '
                '[[5]]".')
_GENERAL = ("Please act as an impartial judge and evaluate the quality of the response "
            "provided by an AI assistant to the user question displayed below. Your evaluation "
            "should consider factors such as the helpfulness, relevance, accuracy, depth, "
            "creativity, and level of detail of the response.")
_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n"
                 "{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n"
                 "### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's Conversation with "
                 "User|>")

JUDGE_PROMPTS = {
    "single-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": f"[Instruction]\n{_GENERAL} Begin your evaluation by providing a "
                           f"short explanation. Be as objective as possible. {_FORMAT_RULE}\n\n"
                           "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n"
                           "{answer}\n[The End of Assistant's Answer]",
        "category": "general"},
    "single-math-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": "[Instruction]\nPlease act as an impartial judge and evaluate the "
                           "quality of the response provided by an AI assistant to the user "
                           "question displayed below. Your evaluation should consider "
                           "correctness and helpfulness. You will be given a reference answer "
                           "and the assistant's answer. Begin your evaluation by comparing the "
                           "assistant's answer with the reference answer. Identify and correct "
                           f"any mistakes. Be as objective as possible. {_FORMAT_RULE}\n\n"
                           "[Question]\n{question}\n\n[The Start of Reference Answer]\n"
                           "{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of "
                           "Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        "category": "math"},
    "single-v1-multi-turn": {
        "system_prompt": f"{_GENERAL} You evaluation should focus on the assistant's answer to "
                         "the second user question. Begin your evaluation by providing a short "
                         f"explanation. Be as objective as possible. {_FORMAT_RULE}\n\n",
        "prompt_template": _CONVERSATION,
        "category": "general"},
    "single-math-v1-multi-turn": {
        "system_prompt": "Please act as an impartial judge and evaluate the quality of the "
                         "response provided by an AI assistant to the user question. Your "
                         "evaluation should consider correctness and helpfulness. You will be "
                         "given a reference answer and the assistant's answer. You evaluation "
                         "should focus on the assistant's answer to the second question. Begin "
                         "your evaluation by comparing the assistant's answer with the "
                         "reference answer. Identify and correct any mistakes. Be as objective "
                         f"as possible. {_FORMAT_RULE}\n\n",
        "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n"
                           "### Reference answer:\n{ref_answer_1}\n\n### User:\n{question_2}"
                           "\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of "
                           "Reference Answer|>\n\n\n" + _CONVERSATION,
        "category": "math"},
}
for _name, _prompt in JUDGE_PROMPTS.items():
    _prompt.update(name=_name, type="single", description="Prompt for general questions",
                   output_format="[[rating]]")
# What each prompt's template may (and, but for the reference, must) name.
PLACEHOLDERS = {"single-v1": {"question", "answer"},
                "single-math-v1": {"question", "answer", "ref_answer_1"},
                "single-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2"},
                "single-math-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2",
                                              "ref_answer_1", "ref_answer_2"}}


def parse_rating(judgment: str) -> int | float:
    """The judge's rating as FastChat reads it: the first [[N]], else the first [N], else -1
    (NO_RATING)."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    if not match:
        return NO_RATING
    # FastChat's ast.literal_eval: an int, or a float with a decimal point — but without its
    # SyntaxError on a zero-padded "[[07]]" (which a temperature-0 judge would repeat forever).
    text = match.group(1)
    return float(text) if "." in text else int(text)


def prompt_name(category: str, turn: int) -> str:
    """FastChat's prompt for a question's turn (1 or 2) in single-answer mode."""
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return name if turn == 1 else f"{name}-multi-turn"


def needs_reference(category: str) -> bool:
    return category in NEED_REF_CATS


def temperature_for(category: str) -> float:
    return TEMPERATURE_CONFIG.get(category, DEFAULT_TEMPERATURE)


def render(prompt: dict, question: dict, answers: list[str], turn: int,
           reference: list[str] | None) -> tuple[str, str]:
    """(system message, user message) for grading `turn` of `answers` to `question`, as
    FastChat's run_judge_single formats them (the reference answer's turns where given)."""
    extra = {}
    if reference is not None:
        extra["ref_answer_1"] = reference[0]
        if turn == 2:
            extra["ref_answer_2"] = reference[1]
    if turn == 2:
        user = prompt["prompt_template"].format(
            question_1=question["turns"][0], question_2=question["turns"][1],
            answer_1=answers[0], answer_2=answers[1], **extra)
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0],
                                                answer=answers[0], **extra)
    return prompt["system_prompt"], user


def _objects(path: str):
    """(where, record) for each JSON object of a JSONL file; DataFormatError naming
    file:line for a line that is not one."""
    for line, record in iter_json_records(path):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}:{line}: "
                                  f"{getattr(record, 'problem', 'expected a JSON object')}")
        yield f"{path}:{line}", record


def load_judge_prompts(path: str) -> dict[str, dict]:
    """A judge_prompts.jsonl (FastChat's format) by name; the four single-answer prompts must
    be there, of type "single" with output_format "[[rating]]" and templates that name only
    the fields FastChat fills in (DataFormatError naming file:line otherwise)."""
    prompts, places = {}, {}
    for where, record in _objects(path):
        if not isinstance(record.get("name"), str):
            raise DataFormatError(f"{where}: name: expected a string")
        prompts[record["name"]], places[record["name"]] = record, where
    missing = [name for name in JUDGE_PROMPTS if name not in prompts]
    if missing:
        raise DataFormatError(f"{path}: no judge prompt named {', '.join(missing)} (MT-Bench's "
                              f"single-answer grading needs {', '.join(JUDGE_PROMPTS)})")
    for name in JUDGE_PROMPTS:
        _check_prompt(prompts[name], places[name])
    return {name: prompts[name] for name in JUDGE_PROMPTS}


def _check_prompt(prompt: dict, where: str) -> None:
    name = prompt["name"]
    for field in ("system_prompt", "prompt_template"):
        if not isinstance(prompt.get(field), str):
            raise DataFormatError(f"{where}: {field}: expected a string in prompt {name!r}")
    if prompt.get("type") != "single" or prompt.get("output_format") != "[[rating]]":
        raise DataFormatError(f"{where}: prompt {name!r} must have type 'single' and "
                              f"output_format '[[rating]]', got {prompt.get('type')!r} and "
                              f"{prompt.get('output_format')!r}")
    try:
        named = {field for _, field, _, _ in string.Formatter().parse(prompt["prompt_template"])
                 if field is not None}
    except ValueError as err:
        raise DataFormatError(f"{where}: prompt_template of {name!r}: {err}") from None
    unknown = named - PLACEHOLDERS[name]
    if unknown:
        raise DataFormatError(f"{where}: prompt_template of {name!r} names {sorted(unknown)}; "
                              f"FastChat fills in only {sorted(PLACEHOLDERS[name])}")


def read_questions(path: str) -> list[dict]:
    """question.jsonl: each line {"question_id", "category", "turns": [1 or 2 strings]};
    other fields ride along. DataFormatError naming file:line and the field otherwise, or
    for a question_id seen before."""
    questions, seen = [], {}
    for where, record in _objects(path):
        qid = record.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataFormatError(f"{where}: question_id: expected an integer or a string, "
                                  f"got {qid!r}")
        if qid in seen:
            raise DataFormatError(f"{where}: question_id {qid!r} again (first at {seen[qid]})")
        seen[qid] = where
        if not isinstance(record.get("category"), str):
            raise DataFormatError(f"{where}: category: expected a string")
        turns = record.get("turns")
        if not isinstance(turns, list) or len(turns) not in (1, 2) or not all(
                isinstance(t, str) and t.strip() for t in turns):
            raise DataFormatError(f"{where}: turns: expected a list of 1 or 2 non-empty strings")
        questions.append(record)
    if not questions:
        raise DataFormatError(f"{path}: no questions")
    return questions


def read_answers(path: str) -> dict[Any, list[str]]:
    """A model_answer / reference_answer JSONL: the first choice's turns by question_id."""
    answers = {}
    for where, record in _objects(path):
        try:
            turns = record["choices"][0]["turns"]
            qid = record["question_id"]
        except (KeyError, IndexError, TypeError):
            raise DataFormatError(f"{where}: expected {{\"question_id\", \"choices\": "
                                  f"[{{\"turns\": [...]}}]}} (FastChat's answer format)") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DataFormatError(f"{where}: choices[0].turns: expected a list of strings")
        answers[qid] = turns
    return answers


def answer_record(question_id: Any, model_id: str, turns: list[str], tstamp: float) -> dict:
    """One line of model_answer/<MODEL>.jsonl. The answer_id is derived from the content
    (FastChat draws a shortuuid): a rerun writes the same ids."""
    digest = hashlib.sha256(json.dumps([model_id, question_id, turns]).encode()).hexdigest()
    return {"question_id": question_id, "answer_id": digest[:22], "model_id": model_id,
            "choices": [{"index": 0, "turns": list(turns)}], "tstamp": tstamp}
