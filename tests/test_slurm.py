"""Sweeps as Slurm job arrays: the script's contents, resumability, errors, and a real single-node Slurm.

``test_real_slurm_runs_the_array`` starts Slurm on this machine through ``scripts/slurm_local.sh``
(munged, slurmctld and slurmd from Debian's slurm-wlm; CI installs and starts them in ``.ci/run``),
submits a two-run sweep with sbatch and waits for both run directories to finish. It skips, giving
the script's reason, only where Slurm cannot start (not installed, not root).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orca import slurm
from orca import sweep as sweep_mod
from orca.errors import OrcaError, UsageError
from orca.schema import ConfigError
from tests.test_sweep import tiny_sweep

REPO = Path(__file__).resolve().parents[1]

GRID_3 = """\
    sweep:
      table: arr
      output_dir: OUT
      grid: {adapter.rank: [1, 2, 4]}
    """


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def finish(run_dir: Path) -> None:
    """Mark a run finished the way the sweep sees it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text("{}")


def task_lists(script: str):
    """The TASKS=( ... ) entries of an array script, each split into its run names."""
    body = re.search(r"^TASKS=\(\n(.*?)^\)$", script, re.S | re.M).group(1)
    return [shlex.split(line)[0].split(",") for line in body.splitlines()]


def test_array_script_lists_only_unfinished_runs(tmp_path, data_root, monkeypatch):
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    out = tmp_path / "runs" / "arr"
    finish(out / "lora_r2_s0")
    monkeypatch.chdir(tmp_path)
    script, job = slurm.slurm_sweep(path, ["train.lr=0.01"], array_limit=1,
                                    sbatch_args="--partition=gpu -t 01:00:00 --gres=gpu:1")
    assert job is None and script == out / "slurm" / "tiny_sweep.sbatch" and os.access(script, os.X_OK)
    text = script.read_text()
    assert task_lists(text) == [["lora_r1_s0"], ["lora_r4_s0"]]  # the finished run is not there
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=orca-tiny_sweep", "#SBATCH --array=0-1%1",
                          f"#SBATCH --output={(out / 'slurm' / 'logs').resolve()}/%A_%a.log",
                          f"#SBATCH --chdir={tmp_path.resolve()}",
                          "#SBATCH --partition=gpu", "#SBATCH -t 01:00:00", "#SBATCH --gres=gpu:1"]
    assert (out / "slurm" / "logs").is_dir()
    # each task calls the sweep back on its own share, with the command line's overrides
    last = text.splitlines()[-1]
    assert last.startswith('exec "${ORCA_PYTHON:-' + sys.executable + '}" -m orca sweep ' + str(path))
    assert last.endswith('train.lr=0.01 --only "${TASKS[$SLURM_ARRAY_TASK_ID]}"')
    # the script is valid bash, and its task index picks the right share
    task = subprocess.run(["bash", "-c", f"{text.split('exec ')[0]}\necho \"${{TASKS[1]}}\""], capture_output=True,
                          text=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0 and task.stdout.strip().endswith("lora_r4_s0")

    # packs of runs per task; the throttle never exceeds the task count
    script, _ = slurm.slurm_sweep(path, runs_per_task=2)
    text = script.read_text()
    assert task_lists(text) == [["lora_r1_s0", "lora_r4_s0"]] and "#SBATCH --array=0-0%1" in text

    # nothing left: no script is written (the old one stays as it was)
    for name in ("lora_r1_s0", "lora_r4_s0"):
        finish(out / name)
    before = script.read_text()
    assert slurm.slurm_sweep(path) == (None, None) and script.read_text() == before


def test_packs_are_array_tasks(tmp_path, data_root, monkeypatch):
    """--slurm --pack K: one task per K unfinished runs, each passing --pack K on to the sweep."""
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    monkeypatch.chdir(tmp_path)
    assert slurm.main([str(path), "--pack", "2"]) == 0
    text = (tmp_path / "runs" / "arr" / "slurm" / "tiny_sweep.sbatch").read_text()
    assert task_lists(text) == [["lora_r1_s0", "lora_r2_s0"], ["lora_r4_s0"]] and "#SBATCH --array=0-1%2" in text
    assert text.splitlines()[-1].endswith(' --pack=2 --only "${TASKS[$SLURM_ARRAY_TASK_ID]}"')
    # the flag the task passes is one the sweep takes
    assert sweep_mod.main([str(path), "--pack=2", "--dry-run"]) == 0


def test_only_trains_the_named_runs_and_skips_finished_ones(tmp_path, data_root, monkeypatch):
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    trained = []
    monkeypatch.setattr("orca.train.run_stage3", lambda cfg, *a, **k: trained.append(Path(cfg.run_dir).name))
    assert sweep_mod.run_sweep(path, gpus=0, only=["lora_r4_s0", "lora_r1_s0"]) == []
    assert trained == ["lora_r1_s0", "lora_r4_s0"]  # sweep order, the third run untouched
    assert not (tmp_path / "runs" / "arr" / "lora_r2_s0").exists()
    finish(tmp_path / "runs" / "arr" / "lora_r1_s0")
    trained.clear()
    assert sweep_mod.run_sweep(path, gpus=0, only=["lora_r1_s0"]) == [] and trained == []
    with pytest.raises(ConfigError, match=r"has no run named lora_r8_s0; .*--dry-run"):
        sweep_mod.run_sweep(path, gpus=0, only=["lora_r8_s0"])
    assert trained == []


@pytest.mark.parametrize("options, message", [
    ("--array=0-3", r"--sbatch sets --array, which the array script sets itself"),
    ("-o out.log", r"--sbatch sets -o"),
    ("gpu", r"'gpu' follows no option"),
    ("--partition='gpu", r"does not parse"),
])
def test_bad_sbatch_options(tmp_path, data_root, monkeypatch, capsys, options, message):
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    monkeypatch.chdir(tmp_path)
    assert slurm.main([str(path), "--sbatch", options]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_submit_without_sbatch_is_one_line(tmp_path, data_root, monkeypatch, capsys):
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm.main([str(path), "--submit"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: squeue not found on PATH, submit from a Slurm login node (or write the script "
                   "without --submit and sbatch it there)\n")


def test_sbatch_lines_and_chunks():
    assert slurm.sbatch_lines("") == []
    assert slurm.sbatch_lines('-p gpu --time 2:00:00 --exclusive --comment="a b"') == [
        "#SBATCH -p gpu", "#SBATCH --time 2:00:00", "#SBATCH --exclusive", "#SBATCH '--comment=a b'"]
    assert slurm.chunk(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError):
        slurm.chunk(["a"], 0)
    with pytest.raises(UsageError, match="--array-limit must be >= 1"):
        slurm.array_script([["a"]], ["-m", "x"], job_name="j", log_dir=Path("/l"), workdir=Path("/w"),
                           python="python", pythonpath="/r", array_limit=0)


def test_cli_flag_errors(tmp_path, data_root, capsys):
    path = tiny_sweep(tmp_path, data_root, GRID_3)
    for argv in ([str(path), "--array-limit", "0"], [str(path), "--per-gpu", "0"], [str(path), "--gpus", "-1"],
                 [str(path), "--pack", "-1"]):
        with pytest.raises(SystemExit) as exc:
            slurm.main(argv)
        assert exc.value.code == 2
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- a real Slurm
def start_local_slurm() -> dict:
    """Bring up scripts/slurm_local.sh's cluster (or find it up); its client environment, or skip."""
    up = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "start"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.skip(f"Slurm cannot start here: {up.stderr.strip().splitlines()[-1] if up.stderr.strip() else up}")
    conf = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "env"], capture_output=True,
                          text=True, check=True).stdout.strip().removeprefix("export SLURM_CONF=")
    return {"SLURM_CONF": conf}


def wait_for(job: str, env: dict, timeout_s: float = 600) -> None:
    """Until the array job has left the queue (squeue forgets it, or no longer lists it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"array job {job} still queued or running after {timeout_s:.0f} s")


def test_real_slurm_runs_the_array(tmp_path, data_root, monkeypatch):
    env = {**os.environ, **start_local_slurm()}
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    path = tiny_sweep(tmp_path, data_root, """\
        sweep:
          table: slurm_test
          output_dir: OUT
          grid: {adapter.rank: [1, 2]}
        """)
    _, runs = sweep_mod.load_sweep(path)
    sweep_mod.build_data_once(runs)  # the tasks then only read the Darcy cache
    out = tmp_path / "runs" / "slurm_test"

    # the documented command line, through scripts/sweep.sh's --slurm hook
    submitted = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh"), str(path), "--slurm", "--submit",
                                "--array-limit", "2", "--sbatch", "--cpus-per-task=1"],
                               capture_output=True, text=True, env={**env, "ORCA_PYTHON": sys.executable}, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted array job (\d+)", submitted.stdout).group(1)
    wait_for(job, env)
    logs = {p.name: p.read_text() for p in (out / "slurm" / "logs").iterdir()}
    assert sorted(logs) == [f"{job}_0.log", f"{job}_1.log"]
    for i, name in enumerate(["lora_r1_s0", "lora_r2_s0"]):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["test"], logs[f"{job}_{i}.log"]
        assert f": {name}\n" in logs[f"{job}_{i}.log"] and "all runs complete" in logs[f"{job}_{i}.log"]
    mtimes = {name: (out / name / "summary.json").stat().st_mtime_ns for name in ("lora_r1_s0", "lora_r2_s0")}

    # resubmitting the same script: each task finds its run finished and trains nothing
    again = subprocess.run(["sbatch", "--parsable", str(out / "slurm" / "tiny_sweep.sbatch")], capture_output=True,
                           text=True, env=env, check=True).stdout.strip().split(";")[0]
    wait_for(again, env)
    for i in range(2):
        assert "1 done, 0 pending" in (out / "slurm" / "logs" / f"{again}_{i}.log").read_text()
    assert {name: (out / name / "summary.json").stat().st_mtime_ns for name in mtimes} == mtimes
    # and the sweep itself has nothing left to submit
    assert slurm.slurm_sweep(path) == (None, None)
