"""The one error type of the data package: a data file that is missing, truncated or corrupt.

Why its own type instead of orca's: ``datasets`` imports nothing of ours (tasks are usable without
the model code), so it cannot raise ``orca.errors.OrcaError``. ``DataFileError`` is a
``ValueError`` carrying the same three parts (what, which file, what to do); the entry points map it
to the same one-line ``error:`` message and exit status 1 as an ``OrcaError``.
"""
from __future__ import annotations

from typing import Optional


class DataFileError(ValueError):
    """A data file cannot be read as what it should be; the message names the path and the fix."""

    exit_code = 1

    def __init__(self, what: str, where: Optional[str] = None, fix: Optional[str] = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(", ".join(part for part in (what, where, fix) if part))
