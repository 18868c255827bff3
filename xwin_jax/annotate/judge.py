"""Pairwise judges behind one interface: `judge.compare(prompt, response_a, response_b)`.

A verdict is {"better": "A" | "B" | "tie", "rating_a": 1-10, "rating_b": 1-10, "reason"}.

    OpenAIJudge(model="gpt-4", base_url=None)   # any OpenAI-compatible endpoint; key from
                                                 # OPENAI_API_KEY unless given; never logged
    RuleJudge()                                  # the synthetic suite's verifiable judge

OpenAIJudge retries 429s (honouring Retry-After), 5xx, timeouts, connection errors, malformed
JSON and truncated answers with exponential backoff, and counts tokens for cost accounting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import random
import threading
import time
from typing import Any

from xwin_jax.data.synthetic import RuleJudge as SyntheticRuleJudge

JUDGE_PROMPT_VERSION = "xwin-pair-v1"
JUDGE_SYSTEM = ("You are a careful, impartial judge of AI assistant answers. You compare two "
                "answers to the same user request for helpfulness, correctness, and concision.")
JUDGE_TEMPLATE = """[User request]
{prompt}

[Answer A]
{response_a}

[Answer B]
{response_b}

Which answer is better, and by how much? Rate each answer from 1 (useless or wrong) to 10
(correct, helpful and concise). Reply with only a JSON object:
{{"better": "A" or "B" or "tie", "rating_a": <1-10>, "rating_b": <1-10>, "reason": "<one sentence>"}}"""


class JudgeError(RuntimeError):
    """A judgment could not be obtained after every retry."""


def render_prompt(prompt: str, response_a: str, response_b: str) -> str:
    return JUDGE_TEMPLATE.format(prompt=prompt, response_a=response_a, response_b=response_b)


def parse_verdict(text: str) -> dict:
    """The verdict in a judge's reply (a JSON object, possibly inside ``` fences or prose);
    ValueError when there is none or it is incomplete."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        raise ValueError("no JSON object in the judge's answer")
    try:
        verdict = json.loads(match.group(0))
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON in the judge's answer: {err.msg}") from None
    better = str(verdict.get("better", "")).strip().upper()
    better = "tie" if better == "TIE" else better
    if better not in ("A", "B", "tie"):
        raise ValueError(f"'better' must be A, B or tie, got {verdict.get('better')!r}")
    ratings = []
    for field in ("rating_a", "rating_b"):
        value = verdict.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise ValueError(f"{field!r} must be a number from 1 to 10, got {value!r}")
        ratings.append(float(value))
    return {"better": better, "rating_a": ratings[0], "rating_b": ratings[1],
            "reason": str(verdict.get("reason", ""))}


class RuleJudge:
    """The synthetic suite's rule judge behind the Judge interface (free, deterministic)."""
    model = SyntheticRuleJudge.name

    def __init__(self):
        self._judge = SyntheticRuleJudge()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}

    def compare(self, prompt: str, response_a: str, response_b: str) -> dict:
        verdict = self._judge.compare(prompt, response_a, response_b)
        self.usage["calls"] += 1
        return {"better": verdict["better"], "rating_a": float(verdict["rating_a"]),
                "rating_b": float(verdict["rating_b"]), "reason": verdict["reason"]}

    def rate(self, prompt: str, response: str) -> float:
        """One response's 1-10 rating (what the quickstart reports as the judge score)."""
        return float(self._judge.rate(prompt, response).score)


@dataclasses.dataclass
class OpenAIJudge:
    model: str = "gpt-4"
    base_url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never printed
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        import openai

        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("OpenAIJudge needs an API key: set OPENAI_API_KEY (or api_key)")
        # Retries are ours (Retry-After, malformed answers), so the client's are off.
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url,
                                     timeout=self.timeout_s, max_retries=0)
        self._lock = threading.Lock()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "retries": 0}

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        with self._lock:
            self.usage["retries"] += 1
        if retry_after is None:
            retry_after = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            retry_after *= 0.5 + random.random() / 2  # jitter: concurrent workers spread out
        time.sleep(retry_after)

    def compare(self, prompt: str, response_a: str, response_b: str) -> dict:
        import openai

        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": render_prompt(prompt, response_a, response_b)}]
        problem = "no attempt"
        for attempt in range(self.max_attempts):
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_tokens)
            except openai.RateLimitError as err:
                problem = f"429: {err}"
                self._wait(attempt, _retry_after(err))
                continue
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                problem = f"{type(err).__name__}: {err}"
                self._wait(attempt, None)
                continue
            except openai.APIStatusError as err:
                if err.status_code < 500:
                    raise JudgeError(f"judge request refused ({err.status_code}): {err}") from err
                problem = f"{err.status_code}: {err}"
                self._wait(attempt, _retry_after(err))
                continue
            with self._lock:
                self.usage["calls"] += 1
                if reply.usage is not None:
                    self.usage["prompt_tokens"] += reply.usage.prompt_tokens
                    self.usage["completion_tokens"] += reply.usage.completion_tokens
            choice = reply.choices[0]
            if choice.finish_reason == "length":
                problem = "the judge's answer was cut off (finish_reason 'length')"
                self._wait(attempt, None)
                continue
            try:
                return parse_verdict(choice.message.content or "")
            except ValueError as err:
                problem = str(err)
                self._wait(attempt, None)
        raise JudgeError(f"no verdict after {self.max_attempts} attempts; last problem: "
                         f"{problem}")


def _retry_after(err: Any) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
