"""The Xwin-LM (Vicuna-style) chat template, tokenized with a loss mask.

    A chat between ... questions. USER: Hi! ASSISTANT: Hello.</s>USER: Who are you?
    ASSISTANT: I am Xwin-LM.</s>         (one line in the text)

The loss mask covers each assistant answer and its </s> and nothing else. A generation prompt
ends with "ASSISTANT:" (no trailing space); the model's answer starts with a space. The system
line is the conversation's own system message, else the caller's default, else Xwin's.

Token ids are built segment by segment (system + user text, answer, </s>, ...) so the mask is
exact; with SentencePiece the dummy prefix stands for the space before each answer. Training
and generation use the same function, so prompts are tokenized identically in both.
"""

from __future__ import annotations

import dataclasses

from xwin_jax.data.formats import ASSISTANT, USER, Conversation
from xwin_jax.errors import ConfigError

XWIN_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's "
               "questions.")
EOS_TEXT = "</s>"
TRUNCATION_POLICIES = ("drop_turns", "truncate")


def system_text(conversation: Conversation, system: str | None) -> str:
    """The conversation's own system message if it has one, else `system` (a caller's
    default), else the Xwin system line. An empty string means no system line."""
    if conversation.system is not None:
        return conversation.system
    return XWIN_SYSTEM if system is None else system


def _head(conversation: Conversation, system: str | None) -> str:
    text = system_text(conversation, system)
    return text + " " if text else ""


def render_text(conversation: Conversation, system: str | None = None,
                add_generation_prompt: bool = False) -> str:
    """The template as text (EOS written as </s>); see system_text for the system line."""
    out = [system_text(conversation, system)]
    for message in conversation.turns:
        if message.role == ASSISTANT:
            out.append(f" ASSISTANT: {message.content}{EOS_TEXT}")
        else:
            out.append(f"{' ' if len(out) == 1 and out[0] else ''}USER: {message.content}")
    if add_generation_prompt:
        out.append(" ASSISTANT:")
    return "".join(out)


@dataclasses.dataclass
class Tokenized:
    ids: list[int]
    loss_mask: list[int]
    dropped_turns: int = 0
    truncated: bool = False


@dataclasses.dataclass
class TruncationStats:
    examples: int = 0
    truncated_examples: int = 0
    dropped_turns: int = 0
    dropped_examples: int = 0  # nothing left to learn from after truncation

    def add(self, result: Tokenized | None) -> None:
        self.examples += 1
        if result is None:
            self.dropped_examples += 1
            return
        self.dropped_turns += result.dropped_turns
        self.truncated_examples += bool(result.truncated or result.dropped_turns)

    def report(self) -> str:
        return (f"{self.examples} examples: {self.truncated_examples} shortened "
                f"({self.dropped_turns} turns dropped), {self.dropped_examples} dropped")


def _answer_ids(vocab, text: str) -> list[int]:
    return vocab.encode(text) if vocab.space_prefix else vocab.encode(" " + text)


def _segments(conversation: Conversation, vocab, system: str | None):
    """[(prompt ids, answer ids + EOS)] per user/assistant exchange."""
    turns = conversation.turns
    head = _head(conversation, system)
    exchanges = []
    for i in range(0, len(turns) - 1, 2):
        user, answer = turns[i], turns[i + 1]
        prompt = vocab.encode(f"{head if i == 0 else ''}USER: {user.content} ASSISTANT:")
        if i == 0:
            prompt = [vocab.bos_id] + prompt
        exchanges.append((prompt, _answer_ids(vocab, answer.content) + [vocab.eos_id]))
    return exchanges


def tokenize_conversation(conversation: Conversation, vocab, max_len: int | None = None,
                          system: str | None = None,
                          truncation: str = "drop_turns") -> Tokenized | None:
    """ids and loss mask (1 on answers and their EOS). Over max_len: 'drop_turns' keeps the
    whole exchanges that fit (cutting the first one if it alone is too long); 'truncate' cuts
    at max_len. None when no answer token survives."""
    if truncation not in TRUNCATION_POLICIES:
        raise ConfigError(f"truncation={truncation!r}: choose one of {TRUNCATION_POLICIES}")
    ids, mask, dropped = [], [], 0
    exchanges = _segments(conversation, vocab, system)
    for k, (prompt, answer) in enumerate(exchanges):
        if (truncation == "drop_turns" and max_len is not None and k > 0
                and len(ids) + len(prompt) + len(answer) > max_len):
            dropped = len(exchanges) - k
            break
        ids += prompt + answer
        mask += [0] * len(prompt) + [1] * len(answer)
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        return None
    return Tokenized(ids, mask, dropped, truncated)


def tokenize_prompt(conversation: Conversation, vocab, system: str | None = None) -> list[int]:
    """Ids of a generation prompt: earlier exchanges, then the last user turn and
    "ASSISTANT:". The conversation ends with a user message."""
    turns = conversation.turns
    where = conversation.source or "prompt"
    for i, message in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if message.role != expected:
            raise ConfigError(f"{where}: turn {i} is a {message.role} message where a {expected} "
                              f"message belongs (turns alternate, user first; a system message "
                              f"only first)")
    if not turns or turns[-1].role == ASSISTANT:
        raise ConfigError(f"{where}: a generation prompt must end with a user message")
    head = _head(conversation, system)
    ids = []
    for i in range(0, len(turns), 2):
        prompt = vocab.encode(f"{head if i == 0 else ''}USER: {turns[i].content} ASSISTANT:")
        ids += ([vocab.bos_id] if i == 0 else []) + prompt
        if i + 1 < len(turns):
            ids += _answer_ids(vocab, turns[i + 1].content) + [vocab.eos_id]
    return ids
