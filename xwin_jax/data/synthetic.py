"""The offline default data: instructions with verifiable answers, imperfect SFT responses,
and a rule judge — written in the file formats users bring, so the real code paths run.

    write_suite("workdir/data", seed=0)   # sft_{train,valid}.jsonl (ShareGPT), pairs_{train,
                                          # valid}.jsonl, prompts_{train,valid,test}.jsonl,
                                          # prompts_multiturn_{train,valid,test}.jsonl
    judge = RuleJudge(); judge.rate(prompt, response)  # → Rating(score 1..10, correct, reason)

Every answer is stated as "The answer is X." Families (FAMILIES): copying a random
four-letter code, writing it in uppercase, giving its first or last letter, the parity of a
three-digit number, and arithmetic (the hard column). The judge recomputes the answer from the
prompt text alone, then scores correctness first and concision second. The SFT responses are
wrong at a rate (a plausible mistake: the letters scrambled, another letter, a number off by a
little) and padded at a rate with filler sentences after the answer.

Multi-turn items: a family prompt, an assistant answer, then a follow-up about that answer
("Now write your answer in uppercase.", "What is the first character of your answer?",
"Reverse your answer."; FOLLOW_UPS). The correct follow-up answer is the follow-up applied to
the *correct* answer of the turn before, which the judge recomputes from that turn's prompt:
the assistant messages in the context are never read, so a wrong earlier answer does not
change what is correct (a good follow-up answer also fixes the earlier mistake). A prompt may
be a str (one turn), a formats.Conversation, or its messages (formats.Message or
{"role", "content"} dicts). In the suite, a share of the train and valid prompts
(`multiturn_fraction`) also appears as a two-exchange SFT conversation (loss on both answers)
and a multi-turn pair (prompt = the messages list); prompts_multiturn_* hold one multi-turn
prompt per prompt of the split (the earlier answer the ideal one). The prompts_* files stay
single-turn: they feed AlpacaEval-style evaluation, rejection sampling and PPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Callable, Sequence

import numpy as np

from xwin_jax import hosts
from xwin_jax.data import formats
from xwin_jax.errors import ConfigError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FILLERS = ("Sure! I would be glad to help with that.", "Let me think about this carefully.",
           "This is a great question, and there are a few things to consider.",
           "I hope this helps! Let me know if you have any other questions.")
ANSWER = re.compile(r"[Tt]he answer is:?\s*(.+?)(?:\.(?=\s|$)|$)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[np.random.Generator], str]  # a prompt
    pattern: re.Pattern
    solve: Callable[[re.Match], str]  # the answer, from the prompt alone


SUITE_VERSION = 6  # bumped whenever write_suite writes something else for the same arguments
CODE_LENGTH = 4


def _code(rng) -> str:
    """A random lowercase string of CODE_LENGTH letters: what the string families transform
    (random, so no answer can be memorized; one length, so the answer's letters always lie at
    the same distance back from the answer, which a small model learns to read in minutes)."""
    return "".join(str(c) for c in rng.choice(list(LETTERS), size=CODE_LENGTH))


def _code_family(name: str, instruction: str, solve: Callable[[str], str]) -> Family:
    """A family "<instruction>: '<code>'." whose answer is solve(code)."""
    return Family(name, lambda r: f"{instruction}: '{_code(r)}'.",
                  re.compile(rf"^{re.escape(instruction)}: '([a-z]+)'\.$"),
                  lambda m: solve(m[1]))


FAMILIES = (
    # Copying a code, converting its case, reading one of its letters or a number's last
    # digit: the answer is read a fixed distance back, which the quickstart's 0.16M model
    # learns within its SFT minutes (README: the offline demo) ...
    _code_family("copy", "Repeat exactly", lambda c: c),
    _code_family("uppercase", "Write in uppercase", str.upper),
    _code_family("first_letter", "Give the first letter of", lambda c: c[0]),
    _code_family("last_letter", "Give the last letter of", lambda c: c[-1]),
    Family("parity",
           lambda r: f"Is {r.integers(100, 1000)} even or odd?",
           re.compile(r"^Is (\d+) even or odd\?$"),
           lambda m: "even" if int(m[1]) % 2 == 0 else "odd"),
    # ... and one it does not: arithmetic stays as the hard column.
    Family("arithmetic",
           lambda r: f"What is {r.integers(2, 100)} {r.choice(['+', '-', '*'])} "
                     f"{r.integers(2, 20)}?",
           re.compile(r"^What is (\d+) ([+\-*]) (\d+)\?$"),
           lambda m: str(eval(f"{m[1]}{m[2]}{m[3]}"))),  # noqa: S307 (digits and one operator)
)


def solve(prompt: str) -> tuple[str, str] | None:
    """(family name, correct answer) for a prompt of the suite, else None."""
    for family in FAMILIES:
        match = family.pattern.match(prompt.strip())
        if match:
            return family.name, family.solve(match)
    return None


# --- multi-turn: follow-ups about the previous answer ---------------------------------------

@dataclasses.dataclass(frozen=True)
class FollowUp:
    name: str
    request: str  # the user's follow-up message
    apply: Callable[[str], str]  # the follow-up's answer, from the previous (correct) answer
    changes: Callable[[str], bool]  # whether it changes that answer (else it tests nothing)


FOLLOW_UPS = (
    FollowUp("uppercase", "Now write your answer in uppercase.", str.upper,
             lambda a: a.upper() != a),
    FollowUp("first_character", "What is the first character of your answer?",
             lambda a: a[0], lambda a: len(a) > 1),
    FollowUp("reverse", "Reverse your answer.", lambda a: a[::-1], lambda a: a[::-1] != a),
)


def follow_up_of(request: str) -> FollowUp | None:
    return next((f for f in FOLLOW_UPS if f.request == request.strip()), None)


def user_requests(prompt) -> list[str]:
    """The user messages of a prompt: a str (one turn), a formats.Conversation, or its
    messages (formats.Message or {"role", "content"} dicts)."""
    if isinstance(prompt, str):
        return [prompt]
    messages = prompt.messages if isinstance(prompt, formats.Conversation) else prompt
    out = []
    for message in messages:
        role, content = ((message.get("role"), message.get("content"))
                         if isinstance(message, dict) else (message.role, message.content))
        if role == formats.USER:
            out.append(content)
    return out


def solve_conversation(prompt) -> tuple[str, str] | None:
    """(name, correct answer to the last user message) for a prompt of the suite (see
    user_requests), else None. A family prompt is answered from its own text; a follow-up
    applies to the correct answer of the user turn before it (the assistant's earlier
    answers are context, never read), so follow-ups chain: name 'reverse+uppercase'."""
    names: list[str] = []
    answer = None
    for request in user_requests(prompt):
        solved = solve(request)
        follow_up = None if solved else follow_up_of(request)
        if solved:  # a new question: what came before does not matter
            names, answer = [solved[0]], solved[1]
        elif follow_up is not None and answer is not None:
            names, answer = names + [follow_up.name], follow_up.apply(answer)
        else:  # not verifiable, nor anything that follows up on it
            names, answer = [], None
    return ("+".join(names), answer) if answer is not None else None


def choose_follow_up(prompt: str, answer: str) -> FollowUp | None:
    """The follow-up a multi-turn item of the suite asks after `prompt` (answered `answer`):
    drawn from a hash of the prompt among those that change the answer; None when none does
    (a single digit or letter)."""
    useful = [f for f in FOLLOW_UPS if f.changes(answer)]
    return useful[_unit(prompt, "follow-up") * len(useful) // 0x100000000] if useful else None


def ideal_response(answer: str) -> str:
    return f"The answer is {answer}."


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
    """A plausible mistake: the other parity, another letter or digit, a number off by a
    little, or the words/letters scrambled."""
    if answer in ("even", "odd"):
        return "odd" if answer == "even" else "even"
    if re.fullmatch(r"[a-zA-Z0-9]", answer):
        alphabet = "0123456789" if answer.isdigit() else "ABCDEFGHIJKLMNOPQRSTUVWXYZ" \
            if answer.isupper() else "abcdefghijklmnopqrstuvwxyz"
        return alphabet[(alphabet.index(answer) + int(rng.integers(1, len(alphabet))))
                        % len(alphabet)]
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + int(rng.choice([-2, -1, 1, 2, 10])))
    parts = answer.split(", ") if ", " in answer else list(answer)
    for _ in range(10):
        shuffled = [str(p) for p in rng.permutation(parts)]
        candidate = ", ".join(shuffled) if ", " in answer else "".join(shuffled)
        if candidate != answer:
            return candidate
    return answer + answer[-1]


def imperfect_response(answer: str, rng: np.random.Generator, wrong_rate: float,
                       verbose_rate: float) -> str:
    """The SFT response: ideal, or (with the given rates) wrong and/or padded with two filler
    sentences after the answer. (Padding before it would move the answer a varying distance
    from the prompt: the 0.16M model then learns no string family in the quickstart's SFT.)"""
    stated = wrong_answer(answer, rng) if rng.random() < wrong_rate else answer
    text = ideal_response(stated)
    if rng.random() < verbose_rate:
        first, second = rng.choice(len(FILLERS), size=2, replace=False)
        text = f"{text} {FILLERS[first]} {FILLERS[second]}"
    return text


# --- the rule judge ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rating:
    score: int  # 1..10
    correct: bool
    reason: str


def stated_answer(response: str) -> str | None:
    """The last "The answer is X." of a response (X), or None."""
    stated = ANSWER.findall(response)
    return stated[-1].strip() if stated else None


def rate_answer(answer: str, response: str) -> Rating:
    """A response against the correct `answer`: stated and correct 10, less a point per half
    an ideal answer's length of excess (at most 4); stated and wrong 3 (2 when also long);
    none stated 1."""
    stated = stated_answer(response)
    ideal = len(ideal_response(answer))
    excess = max(0, len(response.strip()) - ideal) / ideal
    verbosity = min(4, int(round(2 * excess)))
    if stated is None:
        return Rating(1, False, "no answer stated")
    if stated == answer:
        return Rating(10 - verbosity, True,
                      "correct" + (f", {verbosity} points off for length" if verbosity
                                   else ", concise"))
    return Rating(3 if verbosity < 2 else 2, False,
                  f"wrong answer {stated!r} (expected {answer!r})")


class RuleJudge:
    """Rates a response 1-10: a correct stated answer scores 6-10 (shorter is better), a wrong
    one 2-3, none at all 1. Unknown prompts raise ValueError."""
    name = "rule-judge-v1"

    def rate(self, prompt, response: str) -> Rating:
        """`prompt`: a str, or a conversation (solve_conversation) whose last user message
        the response answers."""
        solved = solve_conversation(prompt)
        if solved is None:
            requests = user_requests(prompt)
            last = requests[-1] if requests else ""
            turns = f" (after {len(requests) - 1} earlier user turns)" if len(requests) > 1 \
                else ""
            raise ConfigError(f"the rule judge cannot verify this prompt: {last[:80]!r}{turns}")
        return rate_answer(solved[1], response)

    def compare(self, prompt, response_a: str, response_b: str) -> dict:
        """Pairwise verdict in the judge output format: which is better and by how much
        (`prompt` as in rate)."""
        a, b = self.rate(prompt, response_a), self.rate(prompt, response_b)
        better = "A" if a.score > b.score else "B" if b.score > a.score else "tie"
        return {"better": better, "rating_a": a.score, "rating_b": b.score,
                "margin": abs(a.score - b.score),
                "reason": f"A: {a.reason}; B: {b.reason}"}


def correct_by_family(prompts, responses) -> dict[str, list[bool]]:
    """{family: [whether each answer is right]} over the prompts the suite can verify (a
    family name, or 'family+follow_up' for a multi-turn prompt); others are left out."""
    judge, out = RuleJudge(), {}
    for prompt, response in zip(prompts, responses, strict=True):
        solved = solve_conversation(prompt)
        if solved is not None:
            out.setdefault(solved[0], []).append(judge.rate(prompt, response).correct)
    return dict(sorted(out.items()))


PAIR_KINDS = ("correct_vs_wrong", "length", "unfinished")


def pair_kind(prompt, chosen: str, rejected: str) -> str:
    """What tells a pair of the suite apart (`prompt` as in RuleJudge.rate): 'unfinished'
    when one side states no answer (a sample cut off before it), 'correct_vs_wrong' when
    exactly one side's answer is right, else 'length' (same correctness, one padded)."""
    if stated_answer(chosen) is None or stated_answer(rejected) is None:
        return "unfinished"
    judge = RuleJudge()
    if judge.rate(prompt, chosen).correct != judge.rate(prompt, rejected).correct:
        return "correct_vs_wrong"
    return "length"


# --- the suite on disk ------------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def _unit(prompt: str, salt: str = "") -> int:
    """32 bits of a hash of the prompt (salted: independent draws for one prompt)."""
    return int(hashlib.sha256((salt + prompt).encode()).hexdigest()[:8], 16)


def split_of(prompt: str, valid_fraction: float, test_fraction: float) -> str:
    """A prompt's split from a hash of its text: the same prompt always lands in one split."""
    u = _unit(prompt) / 0xFFFFFFFF
    return "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction \
        else "train"


def families_named(names: Sequence[str] | None) -> tuple[Family, ...]:
    """The FAMILIES of those names, in FAMILIES' order (None: all of them)."""
    if names is None:
        return FAMILIES
    known = {f.name for f in FAMILIES}
    unknown = sorted(set(names) - known)
    if unknown or not names:
        raise ConfigError(f"families={list(names)}: choose one or more of {sorted(known)}")
    return tuple(f for f in FAMILIES if f.name in set(names))


def make_prompts(seed: int, count: int, families: Sequence[str] | None = None) -> list[str]:
    """`count` distinct prompts, the named families (None: all) in turn (a family whose
    prompts run out, such as the parity of a three-digit number, stops contributing)."""
    chosen = families_named(families)
    rng = np.random.default_rng(seed)
    seen, prompts = set(), []
    attempts = 0
    while len(prompts) < count:
        attempts += 1
        if attempts > 100 * count:
            raise ConfigError(f"cannot make {count} distinct prompts")
        prompt = chosen[attempts % len(chosen)].make(rng)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def _exchange(prompt: str, answer: str) -> tuple[formats.Message, formats.Message]:
    return formats.Message(formats.USER, prompt), formats.Message(formats.ASSISTANT, answer)


def multiturn_prompt(prompt: str, earlier_answer: str) -> tuple[formats.Message, ...] | None:
    """(prompt, the assistant's `earlier_answer`, a follow-up about it): a multi-turn prompt
    of the suite, or None when no follow-up changes the prompt's answer (choose_follow_up)."""
    follow_up = choose_follow_up(prompt, solve(prompt)[1])
    if follow_up is None:
        return None
    return (*_exchange(prompt, earlier_answer), formats.Message(formats.USER, follow_up.request))


def is_multiturn_item(prompt: str, fraction: float) -> bool:
    """Whether a train/valid prompt also makes a multi-turn SFT example and pair: drawn from
    a hash of the prompt (so the share does not depend on the order or the other prompts)."""
    return (_unit(prompt, "multiturn") < fraction * 0x100000000
            and choose_follow_up(prompt, solve(prompt)[1]) is not None)


def write_suite(out_dir: str, seed: int = 0, num_prompts: int = 3000,
                valid_fraction: float = 0.1, test_fraction: float = 0.1,
                wrong_rate: float = 0.3, verbose_rate: float = 0.3,
                multiturn_fraction: float = 0.15,
                families: Sequence[str] | None = None) -> dict[str, str]:
    """Writes the suite of the named `families` (None: all); returns {name: path}.
    Deterministic in its arguments.

    A `multiturn_fraction` of the train and valid prompts also makes a multi-turn item (a
    follow-up about the answer: the module docstring), appended to sft_train, sft_valid,
    pairs_train and pairs_valid; prompts_multiturn_<split> hold a multi-turn prompt for every
    prompt of the split that has a follow-up. The multi-turn items draw from random streams of
    their own, so the single-turn records do not depend on them."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    judge = RuleJudge()
    by_split = {s: [] for s in SPLITS}
    for prompt in make_prompts(seed, num_prompts, families):
        by_split[split_of(prompt, valid_fraction, test_fraction)].append(prompt)

    def pair(prompt, first, second):  # prompt: a str, or the messages of a multi-turn prompt
        verdict = judge.compare(prompt, first, second)
        if verdict["better"] == "tie":
            return None
        chosen, rejected = (first, second) if verdict["better"] == "A" else (second, first)
        return {"prompt": prompt if isinstance(prompt, str) else formats.messages_to_json(prompt),
                "chosen": chosen, "rejected": rejected,
                "chosen_rating": max(verdict["rating_a"], verdict["rating_b"]),
                "rejected_rating": min(verdict["rating_a"], verdict["rating_b"])}

    sft, pairs = [], []
    for prompt in by_split["train"]:
        answer = solve(prompt)[1]
        response = imperfect_response(answer, rng, wrong_rate, verbose_rate)
        conversation = formats.Conversation(_exchange(prompt, response))
        sft.append(formats.conversation_to_sharegpt(conversation))
        made = pair(prompt, response, imperfect_response(answer, rng, wrong_rate, verbose_rate))
        if made:
            pairs.append(made)
    valid_rng = np.random.default_rng([seed, 2])  # held-out pairs for reward-model evaluation
    valid_pairs = [made for prompt in by_split["valid"] for made in [pair(
        prompt, *(imperfect_response(solve(prompt)[1], valid_rng, wrong_rate, verbose_rate)
                  for _ in range(2)))] if made]
    sft_valid = [formats.conversation_to_sharegpt(formats.Conversation(_exchange(
        p, ideal_response(solve(p)[1])))) for p in by_split["valid"]]

    # Multi-turn items. The earlier answer in the context is an SFT-style answer without
    # filler (wrong at wrong_rate: the follow-up is still judged against the correct one), so
    # two exchanges fit the quickstart's 512 byte tokens.
    for split, stream, sft_records, pair_records in (("train", 3, sft, pairs),
                                                      ("valid", 4, sft_valid, valid_pairs)):
        mt_rng = np.random.default_rng([seed, stream])
        for prompt in (p for p in by_split[split] if is_multiturn_item(p, multiturn_fraction)):
            earlier = imperfect_response(solve(prompt)[1], mt_rng, wrong_rate, 0.0)
            context = multiturn_prompt(prompt, earlier)
            answer = solve_conversation(context)[1]
            first, second = (imperfect_response(answer, mt_rng, wrong_rate, verbose_rate)
                             for _ in range(2))
            if split == "train":
                sft_records.append(formats.conversation_to_sharegpt(formats.Conversation(
                    context + (formats.Message(formats.ASSISTANT, first),))))
            else:  # held out: the ideal answers, like the single-turn ones
                sft_records.append(formats.conversation_to_sharegpt(formats.Conversation(
                    multiturn_prompt(prompt, ideal_response(solve(prompt)[1]))
                    + (formats.Message(formats.ASSISTANT, ideal_response(answer)),))))
            made = pair(context, first, second)
            if made:
                pair_records.append(made)

    paths = {"sft_train": os.path.join(out_dir, "sft_train.jsonl"),
             "sft_valid": os.path.join(out_dir, "sft_valid.jsonl"),
             "pairs_train": os.path.join(out_dir, "pairs_train.jsonl")}
    formats.write_jsonl(paths["sft_train"], sft)
    formats.write_jsonl(paths["sft_valid"], sft_valid)
    formats.write_jsonl(paths["pairs_train"], pairs)
    paths["pairs_valid"] = os.path.join(out_dir, "pairs_valid.jsonl")
    formats.write_jsonl(paths["pairs_valid"], valid_pairs)
    for split in SPLITS:
        paths[f"prompts_{split}"] = os.path.join(out_dir, f"prompts_{split}.jsonl")
        formats.write_jsonl(paths[f"prompts_{split}"], [
            {"prompt": p, "answer": solve(p)[1], "family": solve(p)[0]} for p in by_split[split]])
    for split in SPLITS:
        name = f"prompts_multiturn_{split}"
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        formats.write_jsonl(paths[name], [
            multiturn_prompt_record(p) for p in by_split[split]
            if choose_follow_up(p, solve(p)[1]) is not None])
    return paths


def multiturn_prompt_record(prompt: str) -> dict:
    """A prompts_multiturn_* record: the messages (the earlier answer the ideal one), the
    correct final answer, the first turn's family and the follow-up."""
    messages = multiturn_prompt(prompt, ideal_response(solve(prompt)[1]))
    name, answer = solve_conversation(messages)
    family, follow_up = name.split("+")
    return {"prompt": formats.messages_to_json(messages), "answer": answer, "family": family,
            "follow_up": follow_up}


def suite_file(name: str, out_dir: str, seed: int = 0, num_prompts: int = 3000,
               wrong_rate: float = 0.3, verbose_rate: float = 0.3) -> str:
    """The path of one suite file (e.g. 'sft_train'), writing the suite first if it is not
    there yet: what gin files bind data paths to for the offline default."""
    marker = os.path.join(out_dir, f"suite-v{SUITE_VERSION}-{seed}-{num_prompts}-{wrong_rate}-"
                                   f"{verbose_rate}.done")

    def write_once():
        if not os.path.exists(marker):
            write_suite(out_dir, seed, num_prompts, wrong_rate=wrong_rate,
                        verbose_rate=verbose_rate)
            open(marker, "w").close()

    hosts.leader_first(f"synthetic suite {marker}", write_once)
    path = os.path.join(out_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"the synthetic suite has no file {name!r} (in {out_dir})")
    return path
