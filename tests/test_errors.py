"""User-caused failures end in one ``error: <what>, <where>, <what to do>`` line with exit 2 (usage,
config) or 1 (run time) and leave every file as it was; ``--debug`` / ORCA_DEBUG=1 add the
traceback; an exception nobody anticipated keeps its traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from datasets.errors import DataFileError
from orca import cli
from orca.errors import FileReadError, OrcaError, UsageError, exit_on_error, reading


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("override, where, hint", [
    ("train.betas=[0.9,", "train.betas", "close its brackets"),
    ("align.mode=}", "align.mode", "quote the value"),
    ("train.lr", "the command line", "section.key=value"),
    ("train.lrr=1e-3", "'train.lrr'", "did you mean 'lr'"),
])
def test_bad_override_is_one_line_exit_2(capsys, override, where, hint):
    assert cli.main(["show-config", override]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert where in line and hint in line
    assert captured.out == ""


@pytest.mark.parametrize("text, what", [
    ("", "config file is empty"),
    ("# only a comment\n", "config file is empty"),
    ("train:\n  lr: [1,\n", "not valid YAML (expected the node content, but found '<stream end>', line 3 column 1)"),
    ("- a\n- b\n", "top level must be a mapping of keys, got list"),
    ("base: 3\n", "'base:' must name another YAML file"),
])
def test_bad_config_file_names_the_file_and_changes_nothing(tmp_path, capsys, text, what):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    before = _snapshot(tmp_path)
    assert cli.main(["stage3", "--config", str(path), f"output_dir={tmp_path / 'runs'}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert what in line and str(path) in line
    assert _snapshot(tmp_path) == before


def test_config_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert cli.main(["show-config", "--config", str(path)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: config is not valid YAML (not UTF-8 text), {path}, fix the file (configs/*.yaml show the format)")


def test_missing_config_and_resume_dir(tmp_path, capsys):
    assert cli.main(["stage3", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: config file not found, {tmp_path / 'nope.yaml'}, configs live in configs/ (see README)")
    assert cli.main(["stage3", "--resume", str(tmp_path)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: --resume needs a run directory holding config.yaml, {tmp_path}, "
        "pass a directory under runs/ that a stage created")
    assert list(tmp_path.iterdir()) == []


def _fails(kind):
    def main(argv):
        if kind == "usage":
            raise UsageError("bad flag", "--x", "drop it")
        if kind == "runtime":
            raise OrcaError("corrupt", "/some/file", "re-create it")
        if kind == "data":
            raise DataFileError("truncated", "/data/x.mat", "delete it")
        if kind == "disk":
            raise OSError(28, "No space left on device", "/runs/x/ckpt/last.pt")
        raise ZeroDivisionError("a bug")
    return main


@pytest.mark.parametrize("kind, code, line", [
    ("usage", 2, "error: bad flag, --x, drop it"),
    ("runtime", 1, "error: corrupt, /some/file, re-create it"),
    ("data", 1, "error: truncated, /data/x.mat, delete it"),
    ("disk", 1, "error: No space left on device, /runs/x/ckpt/last.pt, free disk space or write elsewhere (output_dir=...)"),
])
def test_exit_on_error_codes_and_debug(capsys, monkeypatch, kind, code, line):
    monkeypatch.delenv("ORCA_DEBUG", raising=False)
    assert exit_on_error(_fails(kind), []) == code
    assert _one_error_line(capsys.readouterr().err) == line
    assert exit_on_error(_fails(kind), ["--debug"]) == code  # the traceback, then the same line
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith(line)
    monkeypatch.setenv("ORCA_DEBUG", "1")
    assert exit_on_error(_fails(kind), []) == code
    assert capsys.readouterr().err.startswith("Traceback")


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("ORCA_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        exit_on_error(_fails("bug"), [])
    with pytest.raises(KeyError):  # a KeyError is never taken for a bad file
        with reading("/x", "a file", "fix it"):
            {}["missing"]


def test_reading_names_the_path_and_keeps_missing_files_plain(tmp_path):
    with pytest.raises(FileReadError) as err:
        with reading(tmp_path / "a.json", "a rank map", "re-run stage 2"):
            raise ValueError("Expecting value: line 1 column 1 (char 0). More detail")
    assert str(err.value) == (f"cannot read a rank map (ValueError: Expecting value: line 1 column 1 (char 0)), "
                              f"{tmp_path / 'a.json'}, re-run stage 2")
    with pytest.raises(FileNotFoundError):
        with reading(tmp_path / "a.json", "a rank map", "re-run stage 2"):
            open(tmp_path / "a.json")


def test_python_m_orca_prints_one_line(tmp_path):
    """The real entry point, run as a user runs it (in-process tests above cover --debug)."""
    proc = subprocess.run([sys.executable, "-m", "orca", "show-config", "train.betas=[0.9,"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _one_error_line(proc.stderr).startswith("error: the value '[0.9,' is not valid YAML")
    assert list(tmp_path.iterdir()) == []
