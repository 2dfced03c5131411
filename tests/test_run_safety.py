"""Nothing a run wrote is lost: resuming a finished run, a start or resume that fails (a full disk), a
killed write, and a run that stops on an error each leave every earlier file as it was and say so."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from orca.cli import main
from orca.config import load_config
from orca.runs import RunDir, atomic_write_bytes
from orca.train import run_stage3

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands in for a crash right after a mid-epoch checkpoint."""


def files_of(path):
    return {os.path.relpath(os.path.join(root, n), path): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(path) for n in names}


def summary_of(path):
    return json.loads((Path(path) / "summary.json").read_text())


def no_space(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def base(tiny_overrides):
    # 3 steps per epoch, a checkpoint every 2 steps; the head method keeps it fast
    return tiny_overrides + ["adapter.method=head", "train.save_every_steps=2"]


def killed_run(base, path, at_step=4):
    def kill(step):
        if step == at_step:
            raise Killed

    with pytest.raises(Killed):
        run_stage3(load_config(None, base + [f"run_dir={path}"]), on_step=kill)


def test_resume_of_finished_run_is_a_no_op_that_writes_nothing(base, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "done"
    run_stage3(load_config(None, base + [f"run_dir={run_dir}"]))
    assert summary_of(run_dir)["status"] == "finished"
    before = files_of(run_dir)
    capsys.readouterr()
    # every way of writing fails: a write would show up as an error, not only as a changed file
    monkeypatch.setattr(torch, "save", no_space)
    monkeypatch.setattr(Path, "write_bytes", no_space)
    monkeypatch.setattr(Path, "write_text", no_space)
    assert main(["stage3", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "is a finished run (2 epochs, test rel_l2 " in out and "nothing to do, nothing written" in out
    assert files_of(run_dir) == before


def test_failed_resume_leaves_every_file_byte_identical(base, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    killed_run(base, run_dir)
    (run_dir / "ckpt" / ".last.pt.tmp999999999").write_bytes(b"")  # what a killed save leaves
    before = files_of(run_dir)
    real = Path.write_bytes

    def full_disk_at_summary(self, data):  # config.yaml's temporary is written, then the disk is full
        if "summary.json" in self.name:
            no_space()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_at_summary)
    changed = load_config(str(run_dir / "config.yaml"), ["train.log_every=2"])  # config.yaml would change
    with pytest.raises(OSError, match="No space left"):
        run_stage3(changed)
    assert files_of(run_dir) == before  # no temporary left behind either

    monkeypatch.setattr(Path, "write_bytes", real)
    run_stage3(changed)  # the same resume with disk space: finishes, and removes the killed save's temporary
    assert summary_of(run_dir)["status"] == "finished"
    assert not [p for p in run_dir.rglob(".*.tmp*")]
    assert "log_every: 2" in (run_dir / "config.yaml").read_text()


def test_resume_that_fails_later_drops_no_metrics_row_and_says_why(base, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    killed_run(base, run_dir)
    rows = (run_dir / "metrics.jsonl").read_text()
    covered = "".join(line + "\n" for line in rows.splitlines() if json.loads(line)["step"] <= 4)
    monkeypatch.setattr(torch, "save", no_space)  # the next checkpoint hits a full disk
    with pytest.raises(OSError, match="No space left"):
        run_stage3(load_config(str(run_dir / "config.yaml")))
    assert (run_dir / "metrics.jsonl").read_text().startswith(covered)
    failed = summary_of(run_dir)
    assert failed["status"] == "failed" and "No space left on device" in failed["reason"] and failed["step"] == 6
    assert not [p for p in run_dir.rglob(".*.tmp*")]


def test_run_in_progress_and_failed_run_are_told_apart(base, tmp_path):
    seen = {}

    def look(step):
        if step == 1:
            seen.update(summary_of(tmp_path / "r"))
        if step == 2:
            raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError):
        run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'r'}"]), on_step=look)
    assert seen["status"] == "running" and seen["pid"] == os.getpid() and seen["epochs"] == 2
    failed = summary_of(tmp_path / "r")
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: the loader broke"
    assert failed["step"] == 2 and failed["epoch"] == 0 and failed["task"] == "darcy"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        no_space()

    with pytest.raises(OSError):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_row_cut_short_by_a_kill_is_skipped(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics({"kind": "epoch", "epoch": 1, "step": 3})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "epoch", "epo')
    assert run.read_metrics() == [{"kind": "epoch", "epoch": 1, "step": 3}]


def test_checkpoint_writer_saves_a_snapshot_with_one_copy_per_dtype(tmp_path, monkeypatch):
    """save_many copies all payloads' tensors at once (one concatenation per device and dtype) and
    writes each file with tensors of its own: later in-place changes reach no file, and a view of a
    stack is written as the view, not its whole buffer."""
    from orca import runs as runs_mod

    stack = torch.arange(24.0).view(2, 3, 4)
    moment = torch.full((2, 3, 4), 0.5)
    index = torch.tensor([3, 1, 2])
    items = [(RunDir(tmp_path / f"run{i}"), "last",
              {"model": {"w": stack[i], "b": stack[i, :, :2]},  # contiguous and strided views
               "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": moment[i]}}, "groups": [0.1, (2, 3)]},
               "index": index, "epoch": i}) for i in range(2)]
    concatenated = []
    cat = torch.cat
    monkeypatch.setattr(runs_mod.torch, "cat", lambda ts, *a, **k: concatenated.append(len(ts)) or cat(ts, *a, **k))
    writer = runs_mod.CheckpointWriter()
    writer.save_many(items)
    stack.mul_(-1)
    moment.zero_()
    index.zero_()
    writer.close()
    assert sorted(concatenated) == [2, 8]  # int64: the two index entries; float32: 4 tensors per run
    for i in range(2):
        saved = torch.load(tmp_path / f"run{i}" / "ckpt" / "last.pt", weights_only=True)
        expected = torch.arange(24.0).view(2, 3, 4)[i]
        assert torch.equal(saved["model"]["w"], expected) and torch.equal(saved["model"]["b"], expected[:, :2])
        assert saved["model"]["b"].untyped_storage().nbytes() == 6 * 4  # the view alone was written
        state = saved["optimizer"]["state"][0]
        assert torch.equal(state["exp_avg"], torch.full((3, 4), 0.5)) and state["step"].item() == 7.0
        assert state["step"].shape == () and torch.equal(saved["index"], torch.tensor([3, 1, 2]))
        assert saved["optimizer"]["groups"] == [0.1, (2, 3)] and saved["epoch"] == i


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_checkpoint_writer_writes_what_a_synchronous_save_writes(tmp_path):
    """The background writer's files load to the same tensors, optimizer states and values as
    RunDir.save_checkpoint of the same payload written in the caller's thread."""
    from orca import runs as runs_mod

    torch.manual_seed(0)
    weights = torch.randn(3, 5, 4)
    model = torch.nn.Linear(4, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    payloads = [{"model": {"w": weights[i], "half": weights[i].half()[:, ::2], **model.state_dict()},
                 "optimizer": opt.state_dict(), "state": {"epoch": 2, "best": 0.25 * i},
                 "rng_cpu": torch.get_rng_state(), "config": {"seed": i}} for i in range(3)]
    for i, payload in enumerate(payloads):
        RunDir(tmp_path / "sync" / str(i)).save_checkpoint("last", payload)
    writer = runs_mod.CheckpointWriter()
    writer.save_many([(RunDir(tmp_path / "bg" / str(i)), "last", p) for i, p in enumerate(payloads[:2])])
    writer.save_many([(RunDir(tmp_path / "bg" / "2"), "last", payloads[2])])  # waits for the first batch
    writer.close()
    for i in range(3):
        sync = torch.load(tmp_path / "sync" / str(i) / "ckpt" / "last.pt", weights_only=True)
        background = torch.load(tmp_path / "bg" / str(i) / "ckpt" / "last.pt", weights_only=True)
        assert _same(sync, background) and sync["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    assert not _same(torch.load(tmp_path / "bg" / "0" / "ckpt" / "last.pt", weights_only=True),
                     torch.load(tmp_path / "bg" / "1" / "ckpt" / "last.pt", weights_only=True))


def test_checkpoint_writer_error_surfaces_as_itself(tmp_path):
    """A write that fails in the writer thread raises its own error in the caller: at the next
    save (at most one batch of writes is pending) or at wait/close, never silently."""
    from orca import runs as runs_mod

    blocked = RunDir(tmp_path / "blocked")
    blocked.ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    blocked.ckpt_dir.write_text("a file where the checkpoint directory should be")
    writer = runs_mod.CheckpointWriter()
    writer.save_many([(blocked, "last", {"w": torch.ones(3)})])  # fails in the writer thread
    ok = RunDir(tmp_path / "ok")
    with pytest.raises((FileExistsError, NotADirectoryError)) as raised:
        writer.save_many([(ok, "last", {"w": torch.zeros(3)})])
    assert "blocked" in str(raised.value)
    assert not (ok.ckpt_dir / "last.pt").exists()  # nothing of the failing call was queued
    writer.save_many([(blocked, "best", {"w": torch.ones(3)})])
    with pytest.raises((FileExistsError, NotADirectoryError)):
        writer.close()
    assert blocked.ckpt_dir.read_text().startswith("a file")
