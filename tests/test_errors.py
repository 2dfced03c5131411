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
    """The stderr's last line, the only ``error:`` line, with no traceback (progress bars may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


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


# ------------------------------------------------------------------------------------------------
# corrupt, truncated and wrong-format files: each error names the path; nothing is written
# ------------------------------------------------------------------------------------------------
GARBAGE = b"\x00\x01 these bytes are no known format \xff" * 8


def _damaged(path, good: bytes, damage: str) -> None:
    path.write_bytes({"garbage": GARBAGE, "truncated": good[: len(good) // 2], "empty": b""}[damage])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_body_weights_name_the_file(tmp_path, damage, capsys, tiny_overrides):
    import torch
    from safetensors.torch import save_file

    from orca.bodies import load_state_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    for suffix, good_bytes in ((".safetensors", good.read_bytes()), (".pth", None)):
        path = tmp_path / f"body{suffix}"
        if good_bytes is None:
            torch.save({"w": torch.ones(64, 64)}, path)
            good_bytes = path.read_bytes()
        _damaged(path, good_bytes, damage)
        with pytest.raises(FileReadError) as err:
            load_state_file(path)
        assert str(err.value).startswith("cannot read a ") and f", {path}, re-export it" in str(err.value)
    # through the entry point: exit 1, one line, no run directory made
    assert cli.main(["stage3", *tiny_overrides, "model.weights=file", f"model.weights_file={path}"]) == 1
    assert str(path) in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, what", [
    (b"{\"rank_map\": {\"a\": 2", "cannot read the rank map (JSONDecodeError: Expecting"),
    (b"[1, 2]", "cannot read the rank map (ValueError: expected a JSON object with a 'rank_map' object"),
    (b"{\"rank_map\": {\"a\": -1}}", "cannot read the rank map (ValueError: rank_map: rank for 'a' is -1"),
    (b"\xff\xfe{}", "cannot read the rank map (UnicodeDecodeError"),
])
def test_unreadable_rank_map_names_the_file(tmp_path, content, what):
    from orca.adapters.config import AdapterConfig

    path = tmp_path / "rank_map.json"
    path.write_bytes(content)
    with pytest.raises(FileReadError) as err:
        AdapterConfig(method="lora", rank_map=str(path)).load_rank_map()
    assert str(err.value).startswith(what), str(err.value)
    assert f", {path}, give the rank_map.json a stage-2 run wrote" in str(err.value)
    with pytest.raises(UsageError, match=r"adapter.rank_map: no such file, .*nope.json"):
        AdapterConfig(method="lora", rank_map=str(tmp_path / "nope.json")).load_rank_map()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_checkpoint_on_resume_is_one_line_and_changes_nothing(tmp_path, damage, capsys, tiny_overrides):
    import torch

    from orca.config import load_config, save_config

    run_dir = tmp_path / "runs" / "r"
    (run_dir / "ckpt").mkdir(parents=True)
    save_config(load_config(None, [*tiny_overrides, f"run_dir={run_dir}"]), run_dir / "config.yaml")
    torch.save({"model": {"w": torch.ones(256, 256)}, "epoch": 1}, run_dir / "ckpt" / "last.pt")
    _damaged(run_dir / "ckpt" / "last.pt", (run_dir / "ckpt" / "last.pt").read_bytes(), damage)
    before = _snapshot(run_dir)
    assert cli.main(["stage3", "--resume", str(run_dir)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: cannot read a checkpoint (truncated, or not a torch file) (")
    assert line.endswith(f", {run_dir / 'ckpt' / 'last.pt'}, delete it and run again, or start a new run")
    assert _snapshot(run_dir) == before


def test_unreadable_embedder_and_spectra_name_the_file(tmp_path):
    from orca.embedders import ConvEmbedder2d
    from orca.model import EMBEDDER_FILE, load_embedder
    from rank_estimation.spectra_file import read_spectra

    (tmp_path / EMBEDDER_FILE).write_bytes(GARBAGE)
    with pytest.raises(FileReadError, match=rf"cannot read the stage-1 embedder \(SafetensorError: .*\), "
                                            rf"{tmp_path / EMBEDDER_FILE}, rerun stage 1"):
        load_embedder(ConvEmbedder2d(1, 16, img_size=32, patch_size=4), str(tmp_path))
    with pytest.raises(UsageError, match=rf"model.embedder_from: no {EMBEDDER_FILE} there, {tmp_path / 'x'}, "):
        load_embedder(ConvEmbedder2d(1, 16, img_size=32, patch_size=4), str(tmp_path / "x"))
    spectra = tmp_path / "delta_w.json.gz"
    spectra.write_bytes(GARBAGE)
    with pytest.raises(FileReadError, match=rf"cannot read a Delta W spectra file \(BadGzipFile: .*\), {spectra}, "):
        read_spectra(spectra)
