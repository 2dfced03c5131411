"""Failures a user can cause, and the one line each one ends in.

Why a hierarchy instead of printing where things fail: the stages are library code (tests and
notebooks call ``run_stage3`` directly), so they raise. Only the entry point decides that a
user-caused failure becomes one line on stderr and an exit status, while an exception nobody
anticipated keeps its traceback, because a bug should look like one.

The line reads ``error: <what>, <which file or key>, <what to do>``.
"""
from __future__ import annotations

from typing import Optional


class OrcaError(Exception):
    """A runtime failure the user can fix (a corrupt file, products of two different tasks, ...)."""

    exit_code = 1

    def __init__(self, what: str, where: Optional[str] = None, fix: Optional[str] = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(", ".join(part for part in (what, where, fix) if part))


class UsageError(OrcaError):
    """The command line or a config is wrong: nothing ran."""

    exit_code = 2


def error_line(err: BaseException) -> str:
    """The single line shown for ``err``: ``error: ...`` with no traceback."""
    return f"error: {err}"
