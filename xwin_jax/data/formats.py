"""Readers for the data formats alignment researchers have on disk.

    sft = read_sft("sharegpt.jsonl")        # ShareGPT, chat-messages or Alpaca (auto-detected)
    pairs = read_pairs("pairs.jsonl")       # prompt (text or messages), chosen, rejected, ratings
    prompts = read_prompts("alpaca_eval.json")  # JSONL with `prompt`, or a list with `instruction`
    outputs = read_outputs("model_outputs.json")  # AlpacaEval's {"instruction", "output", ...}
    xwin_set = read_xwin_set("samples.jsonl")   # n scored responses per prompt (Xwin-Set)

Files may be JSONL (one object per line) or one JSON array. Every malformed record raises a
DataFormatError naming file:line and the field; with skip_invalid=True it is counted and listed
in `result.skipped` instead. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from xwin_jax.errors import UserError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
SHAREGPT_ROLES = {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT,
                  "assistant": ASSISTANT, "chatgpt": ASSISTANT, "bard": ASSISTANT,
                  "bing": ASSISTANT}
CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class DataFormatError(UserError, ValueError):
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
    """(line number, parsed object) for a JSONL file or a JSON array file.

    JSONL lines end at "\\n" only (as JSON and every JSONL writer mean them): U+2028, U+0085
    and the other breaks str.splitlines() knows are text inside a record. A line that is not
    UTF-8 or not JSON is yielded as a problem naming its column, for the caller to report."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(path, data)
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, _BadJson(f"not valid UTF-8 (byte {err.start + 1} of the line: "
                                   f"{raw[err.start:err.start + 1]!r})")
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _BadJson(f"invalid JSON: {err.msg} (column {err.colno})")


class _BadJson:
    def __init__(self, problem: str):
        self.problem = problem


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataFormatError(f"{path}:{line}: not valid UTF-8 (byte {column} of the line)"
                              ) from None
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

def _text(record: dict, field: str, *, allow_empty: bool = False, where: str = "") -> str:
    """record[field] as a non-empty string; errors name `where.field` (the full path of a
    nested field, e.g. conversations[1].value)."""
    name = f"{where}.{field}" if where else field
    if field not in record:
        raise _Invalid(name, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise _Invalid(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Invalid(name, "empty")
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
        out.append(Message(roles[role], _text(item, content_key, where=where,
                                              allow_empty=roles[role] == SYSTEM)))
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


# --- model outputs (AlpacaEval) ---------------------------------------------------------------

def parse_output(record: dict, source: str = "") -> dict:
    """An AlpacaEval model output: the record itself, once `instruction` (non-empty) and
    `output` (possibly empty) are known to be strings; `generator`, `dataset` ... ride along."""
    _text(record, "instruction")
    _text(record, "output", allow_empty=True)
    return record


def read_outputs(path: str, *, skip_invalid: bool = False) -> ReadResult[dict]:
    return _read(path, parse_output, skip_invalid)


# --- Xwin-Set (n scored responses per prompt) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class XwinSetEntry:
    """One prompt of an Xwin-Set: its n responses in sample order, their normalised reward
    scores, and whether each ended with EOS (train/rejection.py writes these)."""
    index: int
    prompt: Conversation  # ends with a user message
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    finished: tuple[bool, ...]
    source: str = ""


def parse_xwin_set_entry(record: dict, source: str = "") -> XwinSetEntry:
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise _Invalid("index", f"expected a prompt index (an integer >= 0), got {index!r}")
    prompt = _prompt_conversation(record)
    lists = {}
    for field in ("responses", "scores", "finished"):
        value = record.get(field)
        if not isinstance(value, list) or not value:
            raise _Invalid(field, "expected a non-empty list")
        lists[field] = value
    if len({len(v) for v in lists.values()}) != 1:
        raise _Invalid("responses", "responses, scores and finished differ in length ("
                       + ", ".join(f"{k} {len(v)}" for k, v in lists.items()) + ")")
    for i, (text, score, done) in enumerate(zip(*lists.values())):
        if not isinstance(text, str):
            raise _Invalid(f"responses[{i}]", f"expected a string, got {type(text).__name__}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
            raise _Invalid(f"scores[{i}]", f"expected a number, got {score!r}")
        if not isinstance(done, bool):
            raise _Invalid(f"finished[{i}]", f"expected true or false, got {done!r}")
    return XwinSetEntry(index, dataclasses.replace(prompt, source=source),
                        tuple(lists["responses"]), tuple(float(s) for s in lists["scores"]),
                        tuple(lists["finished"]), source)


def read_xwin_set(path: str, *, skip_invalid: bool = False) -> ReadResult[XwinSetEntry]:
    result = _read(path, parse_xwin_set_entry, skip_invalid)
    seen: dict[int, str] = {}
    for entry in result.records:
        if entry.index in seen:
            raise DataFormatError(f"{entry.source}: field 'index': prompt {entry.index} "
                                  f"again (first at {seen[entry.index]})")
        seen[entry.index] = entry.source
    return result


def prompt_to_json(conversation: Conversation) -> str | list[dict]:
    """A prompt as the `prompt` field of a pairs, prompts or Xwin-Set record: the text of a
    lone user message, else the messages list (earlier turns, a system message)."""
    messages = conversation.messages
    return messages[0].content if len(messages) == 1 else messages_to_json(messages)


# --- writing (the synthetic suite and generated data use the same formats) ------------------

def conversation_to_sharegpt(conversation: Conversation) -> dict:
    names = {SYSTEM: "system", USER: "human", ASSISTANT: "gpt"}
    return {"conversations": [{"from": names[m.role], "value": m.content}
                              for m in conversation.messages]}


def messages_to_json(messages: tuple[Message, ...]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


# Line breaks other than "\n" that str.splitlines() (and readers built on it) split on; JSON
# lets them stand unescaped inside strings, so a line holding one would read back as two.
_OTHER_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(record: Any) -> str:
    """One JSONL line, newline included: UTF-8 text as is, except the line breaks other
    than \\n, which are escaped so that every reader splits the file the same way."""
    text = json.dumps(record, ensure_ascii=False)
    for char, escaped in _OTHER_LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text + "\n"


def _complete_lines(data: bytes, key: str) -> tuple[dict[Any, dict], list[bytes]]:
    """The records of the complete lines (those ending in a newline), by record[key], and
    the lines that hold one (what the file should keep)."""
    records, good = {}, []
    for raw in data.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            record = json.loads(raw.decode("utf-8"))
            records[record[key]] = record
            good.append(raw + b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return records, good


def read_appended_jsonl(path: str, key: str) -> dict[Any, dict]:
    """The records of a JSONL file a job appends to as it goes (generated answers, sampled
    responses, cached verdicts), by record[key]. What a kill cut off — torn JSON, a torn
    UTF-8 character, a missing final newline — is dropped, so later appends start on a clean
    line and the dropped record is simply redone: a torn last line is cut off where the last
    complete one ends (the lines before it stay as they are on disk), and a bad line further
    up (which no kill leaves: a damaged disk) by an atomic rewrite (temporary file, fsync,
    os.replace), so a crash at any moment leaves either file whole."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    records, good = _complete_lines(data, key)
    kept = sum(map(len, good))
    if kept == len(data):
        return records
    if data.startswith(b"".join(good)):  # only the tail is bad
        with open(path, "r+b") as f:
            f.truncate(kept)
            _sync(f)
    else:
        tmp = f"{path}.{os.getpid()}.partial"
        with open(tmp, "wb") as f:
            f.writelines(good)
            _sync(f)
        os.replace(tmp, path)
    return records


def append_jsonl(path: str, records: Iterable[Any], *, sync: bool = True) -> None:
    """Appends records to a file read back by read_appended_jsonl, one line each, flushed
    (with sync, fsynced: call at a batch boundary, so what a crash keeps is whole batches)."""
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.writelines(jsonl_line(record) for record in records)
        if sync:
            _sync(f)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_jsonl(path: str, records: list[dict]) -> None:
    """Writes atomically (a temporary file renamed into place; concurrent writers of the
    same content, e.g. several hosts, cannot interleave)."""
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(jsonl_line(record))
    os.replace(tmp, path)
