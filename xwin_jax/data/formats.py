"""Readers for the data formats alignment researchers have on disk.

    sft = read_sft("sharegpt.jsonl")        # ShareGPT, chat-messages or Alpaca (auto-detected)
    pairs = read_pairs("pairs.jsonl")       # prompt (text or messages), chosen, rejected, ratings
    prompts = read_prompts("alpaca_eval.json")  # JSONL with `prompt`, or a list with `instruction`

Files may be JSONL (one object per line) or one JSON array. Every malformed record raises a
DataFormatError naming file:line and the field; with skip_invalid=True it is counted and listed
in `result.skipped` instead. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Generic, Iterator, TypeVar

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
SHAREGPT_ROLES = {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT,
                  "assistant": ASSISTANT, "chatgpt": ASSISTANT, "bard": ASSISTANT,
                  "bing": ASSISTANT}
CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class DataFormatError(ValueError):
    """A record does not have the shape its format needs; the message names file:line."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Optional system message, then user/assistant turns alternating, ending with the
    assistant (SFT) or the user (a prompt)."""
    messages: tuple[Message, ...]
    source: str = ""

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == SYSTEM \
            else None

    @property
    def turns(self) -> tuple[Message, ...]:
        return self.messages[1:] if self.system is not None else self.messages


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # ends with a user message
    chosen: str
    rejected: str
    chosen_rating: float | None = None
    rejected_rating: float | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Prompt:
    conversation: Conversation  # ends with a user message
    record: dict  # the original record (AlpacaEval keeps `dataset` etc. for its output)
    source: str = ""

    @property
    def text(self) -> str:
        return self.conversation.messages[-1].content


T = TypeVar("T")


@dataclasses.dataclass
class ReadResult(Generic[T]):
    path: str
    records: list[T]
    skipped: list[str]

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def report(self) -> str:
        text = f"{self.path}: {len(self.records)} records"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return text


class _Invalid(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")


# --- raw records with line numbers ------------------------------------------------------------

def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for a JSONL file or a JSON array file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _BadJson(f"invalid JSON: {err.msg} (column {err.colno})")


class _BadJson:
    def __init__(self, problem: str):
        self.problem = problem


def _iter_json_array(path: str, text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise DataFormatError(f"{path}: JSON array is not closed")
        if text[index] == "]":
            return
        line = text.count("\n", 0, index) + 1
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            # The rest of an array cannot be found reliably once an element is broken.
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        yield line, value


def _read(path: str, parse: Callable[[Any, str], T], skip_invalid: bool) -> ReadResult[T]:
    records, skipped = [], []
    for line, raw in iter_json_records(path):
        where = f"{path}:{line}"
        try:
            if isinstance(raw, _BadJson):
                raise _Invalid("<line>", raw.problem)
            if not isinstance(raw, dict):
                raise _Invalid("<record>", f"expected a JSON object, got {type(raw).__name__}")
            records.append(parse(raw, where))
        except _Invalid as err:
            if not skip_invalid:
                raise DataFormatError(f"{where}: {err}") from None
            skipped.append(f"{where}: {err}")
    return ReadResult(path, records, skipped)


# --- field helpers ----------------------------------------------------------------------------

def _text(record: dict, field: str, *, allow_empty: bool = False) -> str:
    if field not in record:
        raise _Invalid(field, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Invalid(field, "empty")
    return value


def _optional_number(record: dict, field: str) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(field, f"expected a number, got {value!r}")
    return float(value)


def _messages(items: Any, field: str, role_key: str, content_key: str,
              roles: dict[str, str]) -> tuple[Message, ...]:
    if not isinstance(items, list) or not items:
        raise _Invalid(field, "expected a non-empty list of messages")
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise _Invalid(where, "expected an object")
        role = item.get(role_key)
        if role not in roles:
            raise _Invalid(f"{where}.{role_key}", f"unknown role {role!r}; expected one of "
                                                  f"{sorted(roles)}")
        out.append(Message(roles[role], _text(item, content_key) if roles[role] != SYSTEM
                           else _text(item, content_key, allow_empty=True)))
    return tuple(out)


def _check_turns(messages: tuple[Message, ...], field: str, *, ends_with: str) -> None:
    """System only first; then user, assistant, user, ... ending with `ends_with`."""
    start = 1 if messages and messages[0].role == SYSTEM else 0
    turns = messages[start:]
    if not turns:
        raise _Invalid(field, "no user/assistant turns")
    for i, message in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if message.role != expected:
            raise _Invalid(f"{field}[{i + start}]",
                           f"expected a {expected} message here (turns alternate, user first), "
                           f"got {message.role}")
    if turns[-1].role != ends_with:
        raise _Invalid(f"{field}[{len(messages) - 1}]",
                       f"the last message must be from the {ends_with}")


# --- SFT conversations ------------------------------------------------------------------------

def parse_conversation(record: dict, source: str = "") -> Conversation:
    """ShareGPT (`conversations`), chat messages (`messages`) or Alpaca (`instruction`)."""
    if "conversations" in record:
        messages = _messages(record["conversations"], "conversations", "from", "value",
                             SHAREGPT_ROLES)
        field = "conversations"
    elif "messages" in record:
        messages = _messages(record["messages"], "messages", "role", "content", CHAT_ROLES)
        field = "messages"
    elif "instruction" in record:
        user = _text(record, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise _Invalid("input", f"expected a string, got {type(extra).__name__}")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages = (Message(USER, user), Message(ASSISTANT, _text(record, "output")))
        field = "output"
    else:
        raise _Invalid("<record>", "expected `conversations` (ShareGPT), `messages` (chat) or "
                                   "`instruction`+`output` (Alpaca)")
    _check_turns(messages, field, ends_with=ASSISTANT)
    return Conversation(messages, source)


def read_sft(path: str, *, skip_invalid: bool = False) -> ReadResult[Conversation]:
    return _read(path, parse_conversation, skip_invalid)


# --- preference pairs -------------------------------------------------------------------------

def _prompt_conversation(record: dict, field: str = "prompt") -> Conversation:
    value = record.get(field)
    if isinstance(value, list):
        messages = _messages(value, field, "role", "content", CHAT_ROLES)
    else:
        messages = (Message(USER, _text(record, field)),)
    _check_turns(messages, field, ends_with=USER)
    return Conversation(messages)


def parse_pair(record: dict, source: str = "") -> PreferencePair:
    prompt = _prompt_conversation(record)
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    return PreferencePair(dataclasses.replace(prompt, source=source), chosen, rejected,
                          _optional_number(record, "chosen_rating"),
                          _optional_number(record, "rejected_rating"), source)


def read_pairs(path: str, *, skip_invalid: bool = False) -> ReadResult[PreferencePair]:
    return _read(path, parse_pair, skip_invalid)


# --- prompt lists -----------------------------------------------------------------------------

def parse_prompt(record: dict, source: str = "") -> Prompt:
    field = "prompt" if "prompt" in record else "instruction" if "instruction" in record else None
    if field is None:
        raise _Invalid("prompt", "missing (expected `prompt`, or AlpacaEval's `instruction`)")
    conversation = _prompt_conversation(record, field)
    return Prompt(dataclasses.replace(conversation, source=source), record, source)


def read_prompts(path: str, *, skip_invalid: bool = False) -> ReadResult[Prompt]:
    return _read(path, parse_prompt, skip_invalid)


# --- writing (the synthetic suite and generated data use the same formats) ------------------

def conversation_to_sharegpt(conversation: Conversation) -> dict:
    names = {SYSTEM: "system", USER: "human", ASSISTANT: "gpt"}
    return {"conversations": [{"from": names[m.role], "value": m.content}
                              for m in conversation.messages]}


def messages_to_json(messages: tuple[Message, ...]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def write_jsonl(path: str, records: list[dict]) -> None:
    """Writes atomically (a temporary file renamed into place; concurrent writers of the
    same content, e.g. several hosts, cannot interleave)."""
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
