"""The offline default data: instructions with verifiable answers, imperfect SFT responses,
and a rule judge — written in the file formats users bring, so the real code paths run.

    write_suite("workdir/data", seed=0)   # sft_{train,valid}.jsonl (ShareGPT), pairs_{train,
                                          # valid}.jsonl, prompts_{train,valid,test}.jsonl
    judge = RuleJudge(); judge.rate(prompt, response)  # → Rating(score 1..10, correct, reason)

Every answer is stated as "The answer is X." Families: arithmetic, reversing, sorting,
counting, case conversion, picking the largest, parity, first letter, last digit, repeating.
The judge recomputes the answer from the prompt text alone, then scores correctness first and
concision second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Callable

import numpy as np

from xwin_jax import hosts
from xwin_jax.data import formats
from xwin_jax.errors import ConfigError

WORDS = ("apple", "river", "planet", "garden", "silver", "window", "tiger", "candle",
         "forest", "rocket", "pencil", "island", "marble", "thunder", "violin", "harbor",
         "banana", "castle", "dragon", "engine", "falcon", "guitar", "hammer", "jacket",
         "kitten", "ladder", "meadow", "needle", "orange", "parrot", "quartz", "rabbit",
         "saddle", "tomato", "umbrella", "valley", "walnut", "yellow", "zipper", "anchor",
         "basket", "cactus", "desert", "feather", "glacier", "horizon", "lantern", "mirror",
         "notebook", "oyster", "pepper", "puzzle", "shadow", "spider", "sunset", "teacup",
         "tunnel", "velvet", "whistle", "blossom")
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


SUITE_VERSION = 4  # bumped whenever write_suite writes something else for the same arguments


def _words(rng, n):
    return [str(w) for w in rng.choice(WORDS, size=n, replace=False)]


FAMILIES = (
    Family("arithmetic",
           lambda r: f"What is {r.integers(2, 100)} {r.choice(['+', '-', '*'])} "
                     f"{r.integers(2, 20)}?",
           re.compile(r"^What is (\d+) ([+\-*]) (\d+)\?$"),
           lambda m: str(eval(f"{m[1]}{m[2]}{m[3]}"))),  # noqa: S307 (digits and one operator)
    Family("reverse",
           lambda r: f"Reverse the letters of the word '{_words(r, 1)[0]}'.",
           re.compile(r"^Reverse the letters of the word '(\w+)'\.$"),
           lambda m: m[1][::-1]),
    Family("sort",
           lambda r: "Sort these numbers in ascending order: "
                     + ", ".join(str(x) for x in r.choice(100, size=r.integers(3, 6),
                                                          replace=False)) + ".",
           re.compile(r"^Sort these numbers in ascending order: ([\d, ]+)\.$"),
           lambda m: ", ".join(str(x) for x in sorted(int(v) for v in m[1].split(", ")))),
    Family("count",
           lambda r: (lambda w: f"How many times does the letter '{r.choice(list(w))}' appear "
                                f"in the word '{w}'?")(_words(r, 1)[0]),
           re.compile(r"^How many times does the letter '(\w)' appear in the word '(\w+)'\?$"),
           lambda m: str(m[2].count(m[1]))),
    Family("uppercase",
           lambda r: f"Write '{' '.join(_words(r, 2))}' in uppercase.",
           re.compile(r"^Write '([a-z ]+)' in uppercase\.$"),
           lambda m: m[1].upper()),
    Family("largest",
           lambda r: "Which is the largest of these numbers: "
                     + ", ".join(str(x) for x in r.choice(1000, size=r.integers(3, 6),
                                                          replace=False)) + "?",
           re.compile(r"^Which is the largest of these numbers: ([\d, ]+)\?$"),
           lambda m: str(max(int(v) for v in m[1].split(", ")))),
    # Three one-step lookups a tiny model learns from the SFT data within minutes, so the
    # offline quickstart has mistakes that alignment can fix (the rest need real reasoning).
    Family("parity",
           lambda r: f"Is {r.integers(1, 1000)} even or odd?",
           re.compile(r"^Is (\d+) even or odd\?$"),
           lambda m: "even" if int(m[1]) % 2 == 0 else "odd"),
    Family("first_letter",
           lambda r: f"What is the first letter of the word '{_words(r, 1)[0]}'?",
           re.compile(r"^What is the first letter of the word '(\w+)'\?$"),
           lambda m: m[1][0]),
    Family("last_digit",
           lambda r: f"What is the last digit of {r.integers(10, 100000)}?",
           re.compile(r"^What is the last digit of (\d+)\?$"),
           lambda m: m[1][-1]),
    Family("repeat",
           lambda r: f"Repeat the word '{_words(r, 1)[0]}' {r.integers(2, 5)} times, "
                     f"separated by spaces.",
           re.compile(r"^Repeat the word '(\w+)' (\d+) times, separated by spaces\.$"),
           lambda m: " ".join([m[1]] * int(m[2]))),
)


def solve(prompt: str) -> tuple[str, str] | None:
    """(family name, correct answer) for a prompt of the suite, else None."""
    for family in FAMILIES:
        match = family.pattern.match(prompt.strip())
        if match:
            return family.name, family.solve(match)
    return None


def ideal_response(answer: str) -> str:
    return f"The answer is {answer}."


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
    """A plausible mistake: the other parity, another letter or digit, a number off by a
    little, or the words/letters scrambled."""
    if answer in ("even", "odd"):
        return "odd" if answer == "even" else "even"
    if re.fullmatch(r"[a-z0-9]", answer):
        alphabet = "0123456789" if answer.isdigit() else "abcdefghijklmnopqrstuvwxyz"
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
    """The SFT response: ideal, or (with the given rates) wrong and/or padded with filler."""
    stated = wrong_answer(answer, rng) if rng.random() < wrong_rate else answer
    text = ideal_response(stated)
    if rng.random() < verbose_rate:
        before, after = rng.choice(len(FILLERS), size=2, replace=False)
        text = f"{FILLERS[before]} {text} {FILLERS[after]}"
    return text


# --- the rule judge ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rating:
    score: int  # 1..10
    correct: bool
    reason: str


class RuleJudge:
    """Rates a response 1-10: a correct stated answer scores 6-10 (shorter is better), a wrong
    one 2-3, none at all 1. Unknown prompts raise ValueError."""
    name = "rule-judge-v1"

    def rate(self, prompt: str, response: str) -> Rating:
        solved = solve(prompt)
        if solved is None:
            raise ConfigError(f"the rule judge cannot verify this prompt: {prompt[:80]!r}")
        _, answer = solved
        stated = ANSWER.findall(response)
        ideal = len(ideal_response(answer))
        excess = max(0, len(response.strip()) - ideal) / ideal
        verbosity = min(4, int(round(2 * excess)))
        if not stated:
            return Rating(1, False, "no answer stated")
        if stated[-1].strip() == answer:
            return Rating(10 - verbosity, True,
                          "correct" + (f", {verbosity} points off for length" if verbosity
                                       else ", concise"))
        return Rating(3 if verbosity < 2 else 2, False,
                      f"wrong answer {stated[-1].strip()!r} (expected {answer!r})")

    def compare(self, prompt: str, response_a: str, response_b: str) -> dict:
        """Pairwise verdict in the judge output format: which is better and by how much."""
        a, b = self.rate(prompt, response_a), self.rate(prompt, response_b)
        better = "A" if a.score > b.score else "B" if b.score > a.score else "tie"
        return {"better": better, "rating_a": a.score, "rating_b": b.score,
                "margin": abs(a.score - b.score),
                "reason": f"A: {a.reason}; B: {b.reason}"}


# --- the suite on disk ------------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def split_of(prompt: str, valid_fraction: float, test_fraction: float) -> str:
    """A prompt's split from a hash of its text: the same prompt always lands in one split."""
    u = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction \
        else "train"


def make_prompts(seed: int, count: int) -> list[str]:
    """`count` distinct prompts, families in turn (a family whose prompts run out, such as
    reversing one of the words, stops contributing)."""
    rng = np.random.default_rng(seed)
    seen, prompts = set(), []
    attempts = 0
    while len(prompts) < count:
        attempts += 1
        if attempts > 100 * count:
            raise ConfigError(f"cannot make {count} distinct prompts")
        prompt = FAMILIES[attempts % len(FAMILIES)].make(rng)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def write_suite(out_dir: str, seed: int = 0, num_prompts: int = 3000,
                valid_fraction: float = 0.1, test_fraction: float = 0.1,
                wrong_rate: float = 0.3, verbose_rate: float = 0.3) -> dict[str, str]:
    """Writes the suite; returns {name: path}. Deterministic in its arguments."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    judge = RuleJudge()
    by_split = {s: [] for s in SPLITS}
    for prompt in make_prompts(seed, num_prompts):
        by_split[split_of(prompt, valid_fraction, test_fraction)].append(prompt)
    def pair(prompt, first, second):
        verdict = judge.compare(prompt, first, second)
        if verdict["better"] == "tie":
            return None
        chosen, rejected = (first, second) if verdict["better"] == "A" else (second, first)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "chosen_rating": max(verdict["rating_a"], verdict["rating_b"]),
                "rejected_rating": min(verdict["rating_a"], verdict["rating_b"])}

    sft, pairs = [], []
    for prompt in by_split["train"]:
        answer = solve(prompt)[1]
        response = imperfect_response(answer, rng, wrong_rate, verbose_rate)
        conversation = formats.Conversation((formats.Message(formats.USER, prompt),
                                             formats.Message(formats.ASSISTANT, response)))
        sft.append(formats.conversation_to_sharegpt(conversation))
        made = pair(prompt, response, imperfect_response(answer, rng, wrong_rate, verbose_rate))
        if made:
            pairs.append(made)
    valid_rng = np.random.default_rng([seed, 2])  # held-out pairs for reward-model evaluation
    valid_pairs = [made for prompt in by_split["valid"] for made in [pair(
        prompt, *(imperfect_response(solve(prompt)[1], valid_rng, wrong_rate, verbose_rate)
                  for _ in range(2)))] if made]
    paths = {"sft_train": os.path.join(out_dir, "sft_train.jsonl"),
             "sft_valid": os.path.join(out_dir, "sft_valid.jsonl"),
             "pairs_train": os.path.join(out_dir, "pairs_train.jsonl")}
    formats.write_jsonl(paths["sft_train"], sft)
    formats.write_jsonl(paths["sft_valid"], [formats.conversation_to_sharegpt(
        formats.Conversation((formats.Message(formats.USER, p), formats.Message(
            formats.ASSISTANT, ideal_response(solve(p)[1]))))) for p in by_split["valid"]])
    formats.write_jsonl(paths["pairs_train"], pairs)
    paths["pairs_valid"] = os.path.join(out_dir, "pairs_valid.jsonl")
    formats.write_jsonl(paths["pairs_valid"], valid_pairs)
    for split in SPLITS:
        paths[f"prompts_{split}"] = os.path.join(out_dir, f"prompts_{split}.jsonl")
        formats.write_jsonl(paths[f"prompts_{split}"], [
            {"prompt": p, "answer": solve(p)[1], "family": solve(p)[0]} for p in by_split[split]])
    return paths


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
