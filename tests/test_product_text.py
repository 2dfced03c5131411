"""The product describes itself, not the workshop it was built in.

Code, configs, scripts, the README and the result summaries state reasons in plain terms: they do
not cite numbered development rounds ("session 12"), tracker issues ("issue 4", "#7"), the limits
of a machine the project borrowed (10-minute commands, 64 MiB of carried files), or design notes
that are not in the repository (SPEC.md and friends). A reader of the repository can follow none
of those. This test scans the product's text files for them.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Directories scanned whole, and files scanned alone (paths relative to the repository root).
PRODUCT_DIRS = ("orca", "rank_estimation", "ibp", "datasets", "scripts", "configs", "tests")
PRODUCT_FILES = ("README.md",)
#: Text files among them; results/ adds its Markdown summaries (not the run directories).
TEXT_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg"}

#: (what it is, pattern). Case-insensitive unless the pattern says otherwise.
WORKSHOP_PATTERNS = [
    ("a numbered development round", re.compile(r"\bsessions?[\s-]*\d+", re.I)),
    ("an issue number", re.compile(r"\bissues?[\s-]*#?\s*\d+", re.I)),
    ("an issue number", re.compile(r"(?<![\w&/)])#\d+\b")),  # not C++ names: {lambda()#3}
    ("a document outside the repository",
     re.compile(r"\b(SPEC|IBP_RANK|STYLE|ARCHITECTURE)(\.md\b|\b)")),
    ("a document outside the repository", re.compile(r"\bshared/[\w./-]*\.md\b")),
    ("a borrowed machine's limits", re.compile(r"\b\d+[\s-]*minute (command|call)s?\b", re.I)),
    ("a borrowed machine's limits", re.compile(r"\b64\s*MiB\b", re.I)),
    ("a borrowed machine's limits", re.compile(r"\bminutes of device time\b", re.I)),
    ("a borrowed machine's limits", re.compile(r"\bdevice time (left|budget)\b", re.I)),
    ("a borrowed machine's limits", re.compile(r"\ba call (may )?carr(y|ies)\b", re.I)),
    ("a borrowed machine's limits", re.compile(r"\b(one|a|per|each) GPU call\b", re.I)),
    ("a borrowed machine", re.compile(r"\b(lent|rented|borrowed) (GPU|machine|H100|H200)", re.I)),
    ("an issue without its number", re.compile(r"\bthe issue('s\b|:)", re.I)),
]


def workshop_mentions(text: str) -> list[tuple[int, str, str]]:
    """Every line of ``text`` that mentions the workshop: (line number, what, the line)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in WORKSHOP_PATTERNS:
            if pattern.search(line):
                found.append((number, what, line.strip()))
                break
    return found


def product_text_files() -> list[Path]:
    files = [ROOT / name for name in PRODUCT_FILES]
    for directory in PRODUCT_DIRS:
        files += [p for p in sorted((ROOT / directory).rglob("*"))
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
                  and p != Path(__file__).resolve()]  # this file plants workshop lines to test the scanner
    results = ROOT / "results"
    files += [p for p in sorted(results.rglob("*.md")) if "runs" not in p.relative_to(results).parts]
    return files


@pytest.mark.parametrize("line, what", [
    ("# measured in session 12 on the H200", "a numbered development round"),
    ("sessions 3-4 measured 0.98x", "a numbered development round"),
    ("Result (Session-15, H200): 1.29x", "a numbered development round"),
    ("# Issue 4's evidence sweeps", "an issue number"),
    ("the criterion of issue #7 holds", "an issue number"),
    ("see #12 for the discussion", "an issue number"),
    ("defaults: ORCA's Darcy recipe, SPEC.md", "a document outside the repository"),
    ("the power law of IBP_RANK.md", "a document outside the repository"),
    ("Pipeline (shared/notes/design.md)", "a document outside the repository"),
    ("each part sized for one 10-minute command", "a borrowed machine's limits"),
    ("the tree is capped at 64 MiB", "a borrowed machine's limits"),
    ("30 minutes of device time", "a borrowed machine's limits"),
    ("for machines like a lent GPU machine", "a borrowed machine"),
    ("10 epochs, to fit one GPU call", "a borrowed machine's limits"),
    ("Speed (the issue's budget: 30 s)", "an issue without its number"),
])
def test_scanner_catches_a_planted_line(line, what):
    text = f"first line\n{line}\nlast line\n"
    assert workshop_mentions(text) == [(2, what, line)]


@pytest.mark.parametrize("line", [
    "Times are ms per step, device time summed over kernels.",
    "the gap carries the rank information; equivalent, silent",
    "color = '#1f77b4'  # matplotlib's first colour",
    "print(f'{value:#04x}')",
    "a regression issue arises when the targets are constant",
    "Swin's window attention on 49-token windows, 7 x 7",
    "the test takes about 10 minutes on 2 cores",
    "::{lambda()#3}::operator()() const>  (a CUDA kernel name)",
])
def test_scanner_passes_plain_text(line):
    assert workshop_mentions(line) == []


def test_product_text_does_not_mention_the_workshop():
    files = product_text_files()
    assert ROOT / "README.md" in files and ROOT / "results" / "README.md" in files
    assert any(p.suffix == ".py" for p in files) and any(p.suffix == ".yaml" for p in files)
    offences = [f"{path.relative_to(ROOT)}:{number}: {what}: {line}"
                for path in files
                for number, what, line in workshop_mentions(path.read_text(encoding="utf-8"))]
    assert not offences, "the product mentions the workshop:\n" + "\n".join(offences)


#: (document, the directory its paths are relative to, the prefixes that mark a path in it).
DOCUMENTED_PATHS = [
    ("README.md", ".", r"(orca|rank_estimation|ibp|datasets|scripts|configs|results|tests)/"),
    ("results/README.md", "results", r"(runs|bench|checkpoints|demo|block_change|reference)/"),
]


def documented_paths(text: str, prefix: str) -> list[str]:
    """The repository paths a document quotes in backticks (``{a,b}`` expanded; globs kept)."""
    paths = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if not re.match(prefix + r"[\w./*{},-]*$", token):
            continue
        braces = re.search(r"\{([^}]*)\}", token)
        paths += ([token[:braces.start()] + alt + token[braces.end():] for alt in braces.group(1).split(",")]
                  if braces else [token])
    return paths


@pytest.mark.parametrize("document, base, prefix", DOCUMENTED_PATHS)
def test_paths_the_documents_quote_exist(document, base, prefix):
    """A module that moves takes its README mention with it."""
    paths = documented_paths((ROOT / document).read_text(encoding="utf-8"), prefix)
    assert len(paths) >= 5
    missing = [p for p in paths
               if not (list((ROOT / base).glob(p)) if "*" in p else (ROOT / base / p).exists())]
    assert not missing, f"{document} quotes paths that do not exist: {missing}"


def test_documented_paths_expands_braces_and_skips_prose():
    text = "see `orca/model.py`, `bench/train_{a,b}.md`, `python -m orca` and `orca`"
    assert documented_paths(text, r"(orca|bench)/") == ["orca/model.py", "bench/train_a.md",
                                                        "bench/train_b.md"]


def test_readme_is_short_and_its_two_commands_are_the_ones_ci_and_users_run():
    """A newcomer reads the README in ten minutes; the commands it gives are the ones that work."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines (at most 250)"
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Two commands' section with a bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[1], "the CI entry point must end with exactly the README's test command"
