"""Each product module holds one idea, so none grows past ~500 lines without saying why at its top.

A long file is where several ideas hide (input checks, a solver, a reference implementation); a
reader opening it should learn from its first lines why it is one file. The convention this test
reads: a module over ``LIMIT`` lines has a line starting ``Why this file is long:`` in its module
docstring.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("orca", "rank_estimation", "ibp", "datasets", "scripts")
LIMIT = 500
REASON = "Why this file is long:"


def unexplained_length(text: str, limit: int = LIMIT) -> bool:
    """True when ``text`` (a Python module) is over ``limit`` lines and its docstring gives no reason."""
    if len(text.splitlines()) <= limit:
        return False
    doc = ast.get_docstring(ast.parse(text)) or ""
    return not any(line.strip().startswith(REASON) for line in doc.splitlines())


def test_the_check_flags_a_long_module_without_a_reason():
    body = "x = 1\n" * 20
    assert unexplained_length('"""A module."""\n' + body, limit=10)
    assert not unexplained_length(f'"""A module.\n\n{REASON} one solver, read top to bottom.\n"""\n' + body, limit=10)
    assert not unexplained_length('"""A module."""\n' + "x = 1\n" * 5, limit=10)
    assert unexplained_length(f'"""A module."""\n# {REASON} not in the docstring\n' + body, limit=10)


def test_product_modules_are_short_or_say_why():
    files = sorted(p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50
    long_ones = [f"{p.relative_to(ROOT)} ({len(p.read_text(encoding='utf-8').splitlines())} lines)"
                 for p in files if unexplained_length(p.read_text(encoding="utf-8"))]
    assert not long_ones, (f"modules over {LIMIT} lines without '{REASON} ...' in their docstring: "
                           + ", ".join(long_ones))
