"""Keeping credentials out of everything a run writes or prints.

A value is secret when the gin binding or macro that holds it is named like a credential (its
last name part ends in key, secret, password, token, credential(s) or auth: `api_key`,
`OPENAI_API_KEY`, `HF_TOKEN`, `judge.OpenAIJudge.api_key`), when it looks like one whatever
its name (`sk-...`, `hf_...`, `ghp_...`, `Bearer ...`, AWS and Google key shapes), when it is
the value of an environment variable named like a credential (OPENAI_API_KEY=...; the
environment is read once, at the first redaction), or when a client registered it as the key
it uses (`register_secret`), wherever it appears. `launch` passes every config it writes
through `redact_gin` and everything it prints through `redact_text`; the sweep and TPU scripts
print and record commands through `redact_args`. Stdlib only, so those scripts can use it
without JAX.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any

REDACTED = "<redacted>"

_SECRET_WORD = r"(?:api_?key|key|secret|password|passwd|token|credentials?|auth)"
# The name's last component (after the last '.' or '/') ends in a secret word, as a whole
# word: OPENAI_API_KEY, api_key, HF_TOKEN, password; not num_tokens, pad_token_id, TOKENIZER.
SECRET_NAME = re.compile(rf"(?:^|[_\-]){_SECRET_WORD}$", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"(?<![\w-])(?:sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{16,}"
    r"|github_pat_[A-Za-z0-9_]{16,}|xox[abpr]-[A-Za-z0-9\-]{8,}|AKIA[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_\-]{30,})"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}")
_BINDING = re.compile(r"^(\s*)([\w./%]+)(\s*=\s*)(.*)$")
_MIN_ENV_SECRET_LEN = 6  # shorter values ("1", "yes") would redact ordinary text


def is_secret_name(name: str) -> bool:
    """Whether a binding, macro or variable name looks like it holds a credential."""
    return bool(SECRET_NAME.search(re.split(r"[./]", name.strip().lstrip("%"))[-1]))


_registered: set[str] = set()
_known: list[str] | None = None  # the environment's secrets and the registered ones, longest
                                 # first; built at the first redaction (every print needs it)


def register_secret(value: str) -> None:
    """Marks a value as secret for the rest of the process (a client registers the key it was
    given, however it was given), so redact_text replaces it wherever it appears."""
    global _known
    if value and len(value) >= _MIN_ENV_SECRET_LEN and value not in _registered:
        _registered.add(value)
        _known = None


def register_gin_binding(binding: str) -> None:
    """Registers the value of a credential-named gin binding (`OPENAI_API_KEY = '...'`, quoted
    or not) before it is parsed, so neither a parse error nor anything later shows it."""
    match = _BINDING.match(binding.strip())
    if match and is_secret_name(match.group(2)):
        value = match.group(4).strip()
        register_secret(value)
        register_secret(value.strip("'\""))


@functools.lru_cache(maxsize=1)
def _environment_secrets() -> frozenset[str]:
    return frozenset(v for k, v in os.environ.items()
                     if is_secret_name(k) and len(v) >= _MIN_ENV_SECRET_LEN)


def _known_secrets() -> list[str]:
    global _known
    if _known is None:
        _known = sorted(_environment_secrets() | _registered, key=len, reverse=True)
    return _known


def redact_text(text: str) -> str:
    """Text with every credential-shaped value, every value of a credential-named environment
    variable and every registered secret replaced by <redacted>."""
    for value in _known_secrets():
        text = text.replace(value, REDACTED)
    return SECRET_VALUE.sub(REDACTED, text)


def redact_gin(config_text: str) -> str:
    """Gin text with the value of every credential-named binding or macro replaced (the
    continuation lines of a multi-line value included), then redact_text over the rest."""
    out, skipping = [], False
    for line in config_text.splitlines(keepends=True):
        if (skipping and line[:1] in (" ", "\t") and line.strip()
                and not _BINDING.match(line)):
            continue  # the rest of a redacted multi-line value
        skipping = False
        match = _BINDING.match(line)
        if match and is_secret_name(match.group(2)):
            ending = "\n" if line.endswith("\n") else ""
            out.append(f"{match.group(1)}{match.group(2)}{match.group(3)}'{REDACTED}'{ending}")
            skipping = True
        else:
            out.append(line)
    return redact_text("".join(out))


_GIN_FLAG = re.compile(r"(--gin\.)([^=]+)(=)(.*)", re.DOTALL)
_GIN_BINDINGS_FLAG = re.compile(r"(--gin_bindings=\s*)([\w./%]+)(\s*=\s*)(.*)", re.DOTALL)
# A gin flag inside a longer argument (a remote shell command): its value ends at whitespace.
_EMBEDDED_GIN_FLAG = re.compile(r"(--gin\.)([\w./%]+)(=)(\S+)")


def redact_args(argv: list[str]) -> list[str]:
    """A command line with the value of every credential-named gin flag (--gin.NAME=VALUE,
    --gin_bindings=NAME = VALUE, also inside a remote shell command) replaced, then
    redact_text over every argument: what the sweep and TPU scripts print and record."""
    def embedded(match: re.Match) -> str:
        if not is_secret_name(match.group(2)):
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}{match.group(3)}{REDACTED}"

    out = []
    for arg in argv:
        match = _GIN_FLAG.fullmatch(arg) or _GIN_BINDINGS_FLAG.fullmatch(arg)
        if match and is_secret_name(match.group(2)):
            arg = f"{match.group(1)}{match.group(2)}{match.group(3)}'{REDACTED}'"
        else:
            arg = _EMBEDDED_GIN_FLAG.sub(embedded, arg)
        out.append(redact_text(arg))
    return out


class RedactingStream:
    """A text stream (stdout, stderr) that redacts what is written to it; everything else
    (isatty, encoding, fileno: what progress bars ask) goes to the wrapped stream."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_process_output() -> None:
    """Routes this process's stdout and stderr through redaction: prints, progress bars,
    tracebacks, and absl/Python logging (whose handler kept the stream it started with)."""
    import logging

    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    for handler in logging.getLogger().handlers:
        _redirect_handler(handler)
    try:
        from absl import logging as absl_logging
        _redirect_handler(absl_logging.get_absl_handler().python_handler)
    except ImportError:  # the sweep and TPU scripts run without absl
        pass


def _redirect_handler(handler: Any) -> None:
    stream = getattr(handler, "stream", None)
    if stream is sys.__stderr__ or stream is getattr(sys.stderr, "_stream", None):
        handler.stream = sys.stderr
    elif stream is sys.__stdout__ or stream is getattr(sys.stdout, "_stream", None):
        handler.stream = sys.stdout
