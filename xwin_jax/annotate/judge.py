"""Pairwise judges behind one interface: `judge.compare(prompt, response_a, response_b)`.

A verdict is {"better": "A" | "B" | "tie", "rating_a": 1-10, "rating_b": 1-10, "reason"}.

    OpenAIJudge(model="gpt-4", base_url=None)   # any OpenAI-compatible endpoint; key from
                                                 # OPENAI_API_KEY unless given; never logged
    RuleJudge()                                  # the synthetic suite's verifiable judge

`judge.fingerprint()` is what decides its verdicts, part of the settings of the stages that
use it (annotate, evaluate: train/stage.py): OpenAIJudge's model, temperature, max_tokens and
a digest of the judge prompt — not the key, the endpoint, concurrency, retries or timeouts.

The verdict in a reply is the first JSON object that parses and carries the fields "better",
"rating_a" and "rating_b" (found by decoding from each "{", so prose, ``` fences, or an
AlpacaEval-style ranking list after the object do not matter; `parse_verdict`).

OpenAIJudge tells two kinds of failure apart:

- transport: 429 (honouring Retry-After), 5xx, timeouts and connection errors are retried with
  exponential backoff and jitter, up to `max_attempts` requests; then the judge is unreachable
  and `compare` raises JudgeError (a UserError). A refused request (any other 4xx, e.g. 401 for
  a bad key) is a JudgeError at once.
- a reply that arrived but holds no usable verdict (no parsable verdict object; cut off with
  finish_reason 'length' before the verdict was complete — a cut-off reply that still holds a
  complete verdict is accepted): asked again `max_parse_retries` times (default once: a
  temperature-0 judge tends to repeat itself), then `compare` raises UnusableReply, which the
  callers (annotate/pairs.py `judge_pairs`) record as an unjudged pair and go on.

`usage` counts replies (`calls`, the paid requests), tokens, transport `retries` and
`parse_retries` separately.

compare() is built on two general methods other judging jobs use too (evaluate/mt_bench.py):
`complete(messages, max_tokens=, temperature=)` sends one chat and returns a Reply (text,
finish_reason) with the transport retries above, and `ask(messages, parse, ...)` adds the
asking again on a reply `parse` cannot use (ValueError), then UnusableReply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
from typing import Any, Callable, Iterator, NamedTuple

from xwin_jax import fingerprint
from xwin_jax.data import formats
from xwin_jax.data.synthetic import RuleJudge as SyntheticRuleJudge
from xwin_jax.errors import UserError
from xwin_jax.redaction import register_secret

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
{{"better": "A" or "B" or "tie", "rating_a": <1-10>, "rating_b": <1-10>, "reason": "<one sentence>"}}"""  # noqa: E501
# A multi-turn prompt: the earlier turns as a transcript, then the single-turn template with
# the last user message as the request. Its own version (in the cache keys of multi-turn
# pairs), so a change to the transcript leaves the single-turn keys valid.
JUDGE_MULTITURN_VERSION = "xwin-pair-multiturn-v1"
JUDGE_TRANSCRIPT_ROLES = {"user": "User", "assistant": "Assistant"}
JUDGE_TEMPLATE_MULTITURN = ("[Conversation so far] (both answers below reply to the user request "
                            "that follows it, in its context)\n{history}\n\n" + JUDGE_TEMPLATE)

VERDICT_FIELDS = ("better", "rating_a", "rating_b")
_DECODER = json.JSONDecoder()


class JudgeError(UserError, RuntimeError):
    """The judge cannot be used: refused requests, or unreachable after every retry."""


# HTTP statuses about one request (too long for the judge's context, a content filter, a
# body it cannot process): that pair stays unjudged and the job goes on. Statuses worth a
# retry are retried like 5xx; any other 4xx (401 bad key, 403, 404 wrong model or URL) is
# about every request and stops the job.
REQUEST_REFUSED = (400, 413, 422)
TRANSIENT = (408, 409)


class UnusableReply(ValueError):
    """A reply arrived but held no usable verdict, also when asked again: the pair stays
    unjudged. `problem` says why; `reply` is the last reply's text; `replies` how many came."""

    def __init__(self, problem: str, reply: str, replies: int):
        super().__init__(f"no usable verdict in {replies} replies: {problem}")
        self.problem, self.reply, self.replies = problem, reply, replies


class Reply(NamedTuple):
    """One reply of OpenAIJudge.complete: its text, finish_reason, and a problem (None, or
    why the reply holds nothing to read, e.g. no choices)."""
    text: str
    finish_reason: str | None
    problem: str | None = None


def prompt_digest() -> str:
    """A digest of what the judge is asked (system message, template, version): part of the
    judge's fingerprint, so of every annotate and evaluate stage. The multi-turn template is
    not in it, so that stages judged before it existed (with paid verdicts) still match their
    command; it is in the cache key of every multi-turn verdict instead (multiturn_digest), so
    a change to it asks the judge again."""
    return fingerprint.digest([JUDGE_PROMPT_VERSION, JUDGE_SYSTEM, JUDGE_TEMPLATE])


def multiturn_digest() -> str:
    """A digest of how a multi-turn prompt is shown to the judge (annotate/pairs.cache_key)."""
    return fingerprint.digest([JUDGE_MULTITURN_VERSION, JUDGE_TEMPLATE_MULTITURN,
                               JUDGE_TRANSCRIPT_ROLES])


def is_multiturn(prompt: str | formats.Conversation) -> bool:
    """Whether a prompt has earlier turns: a Conversation with more than its last user
    message. A system message alone does not count (the judge is not shown it)."""
    return isinstance(prompt, formats.Conversation) and len(prompt.turns) > 1


def judged_prompt(prompt: str | formats.Conversation) -> str | formats.Conversation:
    """What the judge is asked about: the text of a single-turn prompt (as every judge has
    been given it), the Conversation of a multi-turn one."""
    if isinstance(prompt, formats.Conversation) and not is_multiturn(prompt):
        return prompt.messages[-1].content
    return prompt


def render_transcript(conversation: formats.Conversation) -> str:
    """The turns before the last user message, one block per message ("User: ...",
    "Assistant: ..."); the system message is not shown, as in a single-turn prompt."""
    return "\n\n".join(f"{JUDGE_TRANSCRIPT_ROLES[m.role]}: {m.content}"
                        for m in conversation.turns[:-1])


def render_prompt(prompt: str | formats.Conversation, response_a: str, response_b: str) -> str:
    """The judge's user message. A str or a single-turn Conversation: JUDGE_TEMPLATE with the
    request (the text every judge prompt of version JUDGE_PROMPT_VERSION has had); a
    multi-turn Conversation: the earlier turns as a transcript, then the same template with
    its last user message."""
    prompt = judged_prompt(prompt)
    if isinstance(prompt, str):
        return JUDGE_TEMPLATE.format(prompt=prompt, response_a=response_a,
                                     response_b=response_b)
    return JUDGE_TEMPLATE_MULTITURN.format(history=render_transcript(prompt),
                                           prompt=prompt.messages[-1].content,
                                           response_a=response_a, response_b=response_b)


def _json_objects(text: str) -> Iterator[dict]:
    """Every JSON object in `text` that decodes, outer before inner, in order of its "{"."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            yield value
        start = text.find("{", start + 1)


def parse_verdict(text: str) -> dict:
    """The verdict in a judge's reply: the first JSON object that parses and has the fields
    "better", "rating_a" and "rating_b" (anything around it — prose, ``` fences, an
    AlpacaEval-style ranking list, other JSON objects — is ignored). ValueError when there is
    none, or when that object's values are out of range."""
    if "{" not in text:
        raise ValueError("no JSON object in the judge's answer")
    verdict = next((o for o in _json_objects(text) if all(k in o for k in VERDICT_FIELDS)),
                   None)
    if verdict is None:
        raise ValueError("no complete JSON object with the fields 'better', 'rating_a' and "
                         "'rating_b' in the judge's answer")
    better = str(verdict["better"]).strip().upper()
    better = "tie" if better == "TIE" else better
    if better not in ("A", "B", "tie"):
        raise ValueError(f"'better' must be A, B or tie, got {verdict['better']!r}")
    ratings = []
    for field in ("rating_a", "rating_b"):
        value = verdict[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise ValueError(f"{field!r} must be a number from 1 to 10, got {value!r}")
        ratings.append(float(value))
    reason = verdict.get("reason", "")
    return {"better": better, "rating_a": ratings[0], "rating_b": ratings[1],
            "reason": reason if isinstance(reason, str) else json.dumps(reason,
                                                                         ensure_ascii=False)}


class RuleJudge:
    """The synthetic suite's rule judge behind the Judge interface (free, deterministic)."""
    model = SyntheticRuleJudge.name

    def __init__(self):
        self._judge = SyntheticRuleJudge()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}

    def compare(self, prompt: str | formats.Conversation, response_a: str,
                response_b: str) -> dict:
        """The verdict on two answers to the prompt's last user message; a Conversation's
        earlier turns decide what is correct for a follow-up (data/synthetic.py)."""
        verdict = self._judge.compare(prompt, response_a, response_b)
        self.usage["calls"] += 1
        return {"better": verdict["better"], "rating_a": float(verdict["rating_a"]),
                "rating_b": float(verdict["rating_b"]), "reason": verdict["reason"]}

    def rate(self, prompt: str | formats.Conversation, response: str) -> float:
        """One response's 1-10 rating (what the quickstart reports as the judge score)."""
        return float(self._judge.rate(prompt, response).score)

    def fingerprint(self) -> dict:
        """What decides its verdicts: its rules (their version), and which class applies them
        (a subclass may judge otherwise)."""
        return {"judge": type(self).__name__, "model": self.model}


@dataclasses.dataclass
class OpenAIJudge:
    model: str = "gpt-4"
    base_url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never printed
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_attempts: int = 6        # requests per pair when they fail in transport (429/5xx/...)
    max_parse_retries: int = 1   # extra requests when a reply arrives without a usable verdict
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        import openai

        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise JudgeError("OpenAIJudge needs an API key and none was given",
                             hint="export OPENAI_API_KEY=... (a local server that checks no "
                                  "key accepts any value)")
        register_secret(key)  # whatever the judge or the client echoes, the key is never shown
        # Retries are ours (Retry-After, unusable replies), so the client's are off.
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url,
                                     timeout=self.timeout_s, max_retries=0)
        self._lock = threading.Lock()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "retries": 0,
                      "parse_retries": 0}
        # Set by the caller (judge_pairs) when the work stops — a fatal error elsewhere,
        # Ctrl-C: a request waiting to retry gives up at once instead of minutes later.
        self.stop_event = threading.Event()

    def fingerprint(self) -> dict:
        """What decides the verdicts (a stage's settings, train/stage.py): the model, its
        sampling settings and the prompt (a digest of the template) — not the key, the
        endpoint, concurrency, retries or timeouts, which change how verdicts arrive, not
        what they are."""
        return {"judge": type(self).__name__, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "prompt": prompt_digest()}

    def _count(self, field: str) -> None:
        with self._lock:
            self.usage[field] += 1

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        self._count("retries")
        if retry_after is None:
            retry_after = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            retry_after *= 0.5 + random.random() / 2  # jitter: concurrent workers spread out
        if self.stop_event.wait(retry_after):
            raise JudgeError("stopped while waiting to retry")

    def _unreachable(self, problem: str) -> JudgeError:
        where = self.base_url or "the OpenAI API"
        return JudgeError(
            f"judge unreachable: {self.max_attempts} requests to {where} failed; last: "
            f"{problem}", hint="check the endpoint (judge.OpenAIJudge.base_url) or wait for "
            "it to recover, then rerun the same command: cached verdicts are not asked again")

    def compare(self, prompt: str, response_a: str, response_b: str) -> dict:
        """The verdict on (A, B). Raises JudgeError (refused, or unreachable after
        max_attempts) or UnusableReply (1 + max_parse_retries replies without a verdict)."""
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": render_prompt(prompt, response_a, response_b)}]
        return self.ask(messages, parse_verdict)

    def ask(self, messages: list[dict], parse: Callable[[str], Any], *,
            max_tokens: int | None = None, temperature: float | None = None) -> Any:
        """parse(text) of the first reply to `messages` it accepts (parse raises ValueError
        on a reply it cannot use: asked again at once, `max_parse_retries` times, then
        UnusableReply). JudgeError and a refused request's UnusableReply as `complete`."""
        replies = 0
        while True:
            try:
                reply = self.complete(messages, max_tokens=max_tokens, temperature=temperature)
            except UnusableReply as err:  # refused: asking again gets the same answer
                raise UnusableReply(err.problem, err.reply, replies) from err
            replies += 1
            problem = reply.problem
            if problem is None:
                try:
                    return parse(reply.text)
                except ValueError as err:
                    problem = str(err)
                    if reply.finish_reason == "length":
                        problem = ("the answer was cut off (finish_reason 'length') before "
                                   f"a complete verdict: {problem}")
            if replies > self.max_parse_retries:
                raise UnusableReply(problem, reply.text, replies)
            self._count("parse_retries")  # asked again at once: nothing to wait for

    def complete(self, messages: list[dict], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> Reply:
        """One reply to a chat (`messages`: OpenAI's role/content dicts), at this judge's
        temperature and max_tokens unless given. Transport failures (429 honouring
        Retry-After, 408/409, 5xx, timeouts, connection errors) are retried with backoff,
        up to max_attempts requests, then JudgeError; a request refused for what it holds
        (400/413/422) raises UnusableReply; any other 4xx is a JudgeError at once. Counts
        the reply and its tokens in `usage`."""
        import openai

        failures = 0
        while True:
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages,
                    temperature=self.temperature if temperature is None else temperature,
                    max_tokens=self.max_tokens if max_tokens is None else max_tokens)
            except openai.RateLimitError as err:
                problem, retry_after = str(err), _retry_after(err)
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                problem, retry_after = f"{type(err).__name__}: {err}", None
            except openai.APIStatusError as err:
                if err.status_code in REQUEST_REFUSED:  # this pair's request, not the judge:
                    raise UnusableReply(  # asking again gets the same answer
                        f"the judge refused this request ({err.status_code}): {err}",
                        str(err), 0) from err
                if err.status_code in TRANSIENT or err.status_code >= 500:
                    problem, retry_after = str(err), _retry_after(err)
                else:
                    raise JudgeError(
                        f"judge request refused ({err.status_code}): {err}",
                        hint="check OPENAI_API_KEY, judge.OpenAIJudge.model and base_url"
                    ) from err
            else:
                text, problem = self._read_reply(reply)
                return Reply(text, _finish_reason(reply), problem)
            failures += 1
            if failures >= self.max_attempts:
                raise self._unreachable(problem)
            self._wait(failures - 1, retry_after)

    def _read_reply(self, reply: Any) -> tuple[str, str | None]:
        """(text, problem or None) of a reply; counts it and its tokens."""
        with self._lock:
            self.usage["calls"] += 1
            usage = getattr(reply, "usage", None)
            if usage is not None:
                self.usage["prompt_tokens"] += usage.prompt_tokens or 0
                self.usage["completion_tokens"] += usage.completion_tokens or 0
        choices = getattr(reply, "choices", None) or []
        if not choices:
            return "", "the reply has no choices"
        message = getattr(choices[0], "message", None)
        return (getattr(message, "content", None) or ""), None


def _finish_reason(reply: Any) -> str | None:
    choices = getattr(reply, "choices", None) or []
    return getattr(choices[0], "finish_reason", None) if choices else None


def _retry_after(err: Any) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
