"""Failures a user can cause, and the one line each one ends in.

Why a hierarchy instead of printing where things fail: the stages are library code (tests and
notebooks call ``run_stage3`` directly), so they raise. Only the entry point decides that a
user-caused failure becomes one line on stderr and an exit status, while an exception nobody
anticipated keeps its traceback, because a bug should look like one.

The line reads ``error: <what>, <which file or key>, <what to do>``. Every entry point (``python
-m orca`` and its ``sweep`` command, ``scripts/*.py``) runs its ``main`` through
:func:`exit_on_error`; ``--debug`` or ``ORCA_DEBUG=1`` prints the traceback above the line.
"""
from __future__ import annotations

import errno
import gzip
import os
import pickle
import zlib
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Type, Union

from datasets.errors import DataFileError


class OrcaError(Exception):
    """A runtime failure the user can fix (a corrupt file, products of two different tasks, ...)."""

    exit_code = 1

    def __init__(self, what: str, where: Optional[str] = None, fix: Optional[str] = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(", ".join(part for part in (what, where, fix) if part))


class UsageError(OrcaError):
    """The command line or a config is wrong: nothing ran."""

    exit_code = 2


class FileReadError(OrcaError):
    """A file we read is truncated, corrupt or of another format; ``where`` is its path."""


# errno values that describe the machine or the path the user gave, not our code
_ENVIRONMENT_ERRNOS = {
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "check the path",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "write somewhere writable (output_dir=...)",
    errno.ENOSPC: "free disk space or write elsewhere (output_dir=...)",
    errno.EDQUOT: "free disk space or write elsewhere (output_dir=...)",
}

UserFailure = (OrcaError, DataFileError)


def error_line(err: BaseException) -> str:
    """The single line shown for ``err``: ``error: ...`` with no traceback.

    Line breaks inside the message (a key or value the user typed with one) are shown escaped, so
    the message stays one line.
    """
    if isinstance(err, OSError) and not isinstance(err, UserFailure):
        fix = _ENVIRONMENT_ERRNOS.get(err.errno, "")
        text = f"{err.strerror or type(err).__name__}, {err.filename}, {fix}".rstrip(", ")
    else:
        text = str(err)
    return "error: " + text.replace("\r", "\\r").replace("\n", "\\n")


def is_user_failure(err: BaseException) -> bool:
    """True for failures the user can cause (shown as one line); False for bugs (shown as tracebacks).

    An ``OSError`` counts when it names a file and its errno is about the path or the machine
    (missing, a directory, no permission, disk full), not about our code.
    """
    if isinstance(err, UserFailure):
        return True
    return isinstance(err, OSError) and err.filename is not None and err.errno in _ENVIRONMENT_ERRNOS


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` on the command line or ``ORCA_DEBUG`` set to anything but empty or 0."""
    return "--debug" in argv or os.environ.get("ORCA_DEBUG", "") not in ("", "0")


def exit_on_error(main: Callable[[List[str]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` (``--debug`` removed) and turn a user failure into one line and its exit status.

    Returns ``main``'s integer result (0 for anything else). A user failure prints
    ``error: ...`` on stderr and returns 2 (usage, config) or 1 (runtime); with debugging requested
    the traceback comes first. Any other exception propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        result = main([a for a in argv if a != "--debug"])
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user failure
        if not is_user_failure(err):
            raise
        if debug:
            traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        return getattr(err, "exit_code", 1)
    return result if isinstance(result, int) else 0


# what parsers raise on bad bytes: json/yaml/unicode -> ValueError, torch.load -> RuntimeError (zip),
# UnpicklingError or EOFError, gzip -> BadGzipFile (an OSError) or zlib.error
READ_ERRORS: Tuple[Type[BaseException], ...] = (OSError, ValueError, EOFError, RuntimeError,
                                                pickle.UnpicklingError, zlib.error, gzip.BadGzipFile)


@contextmanager
def reading(path: Union[str, Path], what: str, fix: str,
            errors: Tuple[Type[BaseException], ...] = READ_ERRORS) -> Iterator[None]:
    """Turn a reader's own exception about ``path`` into a :class:`FileReadError` naming the path.

    Wrap only the call that parses the file: the exception types here (``ValueError``,
    ``RuntimeError``) are what parsers raise on bad bytes, and a wider block would hide bugs.
    A missing file stays the plain ``FileNotFoundError`` the entry point already reports.

        with reading(path, "a safetensors weights file", "re-export or re-download it"):
            state = load_file(path)
    """
    try:
        yield
    except UserFailure:
        raise
    except FileNotFoundError:
        raise
    except errors as err:
        raise FileReadError(f"cannot read {what} ({_reason(err)})", str(path), fix) from err


def _reason(err: BaseException) -> str:
    """The parser's complaint in a few words: its first sentence, at most 120 characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    name = type(err).__name__
    return f"{name}: {text[:120]}" if text else name
