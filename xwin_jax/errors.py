"""The one error type a user can act on.

Every error whose message tells the user what to change — a setting, an input file and line, a
checkpoint, a judge endpoint, a run that stopped on a non-finite update — is a `UserError`.
`python -m xwin_jax.launch` prints it as one line (`error: ...`, then `hint: ...` where there
is one) and exits 2; `--verbose` (or XWIN_VERBOSE=1) also prints the traceback. Any other
exception is a bug and keeps its traceback.

The specific types (DataFormatError, CheckpointError, JudgeError, NonFiniteError, ...) subclass
UserError together with the builtin they always were (ValueError, RuntimeError), so existing
`except ValueError` code keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; `hint` says how, where one line of advice helps."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the setting (gin binding or field)."""
