"""The plateau pilots' bookkeeping (scripts/_prereg.sh): the runs it asks the sweeps for exist, and a
task's knee sweep is released only by passing verdicts for every pilot it needs."""
import shutil
import subprocess

import pytest

from orca.cli import CONFIG_SCHEMA
from orca.runs import REPO_ROOT, write_json
from orca.sweep import load_sweep
from tests.conftest import prereg_shell

TASKS = ("darcy", "tones", "digits", "patches", "heldout", "dial")


def run_names(task: str, kind: str):
    _, runs = load_sweep(REPO_ROOT / f"configs/experiments/prereg/{task}_{kind}.yaml", schema=CONFIG_SCHEMA)
    return {run.name for run in runs}


@pytest.mark.parametrize("task", TASKS)
def test_pilot_runs_are_runs_of_the_task_sweeps(task):
    suffixes = [s if s != "-" else "" for s in prereg_shell(f"pilot_suffixes {task}").split()]
    assert len(suffixes) == (2 if task == "dial" else 1)
    warmups, knees = run_names(task, "warmup"), run_names(task, "knee")
    for sfx in suffixes:
        assert f"head{sfx}_s0" in warmups
        assert f"lora_r8{sfx}_s0" in knees


def test_dial_pilots_sit_at_both_ends():
    assert prereg_shell("pilot_suffixes dial").split() == ["_level-0", "_level-6"]
    assert prereg_shell("pilot_keys dial").split() == ["knee_dial_level-0", "knee_dial_level-6"]
    assert prereg_shell("pilot_keys darcy").split() == ["knee_darcy"]


def released(task: str, pilots_dir) -> bool:
    return prereg_shell(f"pilots_passed {task} && echo yes || echo no", pilots_dir).strip() == "yes"


def test_a_sweep_needs_every_pilot_passed(tmp_path):
    assert not released("darcy", tmp_path)
    write_json(tmp_path / "knee_darcy.json", {"passed": False})
    assert not released("darcy", tmp_path)
    write_json(tmp_path / "knee_darcy.json", {"passed": True})
    assert released("darcy", tmp_path)
    # the dial: one end is not enough
    write_json(tmp_path / "knee_dial_level-6.json", {"passed": True})
    assert not released("dial", tmp_path)
    write_json(tmp_path / "knee_dial_level-0.json", {"passed": True})
    assert released("dial", tmp_path)
    assert not released("tones", tmp_path)


def test_a_seeds_override_picks_whole_seeds_of_a_sweep():
    """PREREG_SEEDS="0 2" reaches the sweep as this override (see test_prereg_seeds_and_phases)."""
    _, runs = load_sweep(REPO_ROOT / "configs/experiments/prereg/darcy_knee.yaml", ["sweep.grid.seed=[0,2]"],
                         schema=CONFIG_SCHEMA)
    assert sorted(r.name for r in runs) == sorted(f"lora_r{r}_s{s}" for r in (1, 2, 4, 8, 16, 32, 64) for s in (0, 2))
    _, runs = load_sweep(REPO_ROOT / "configs/experiments/prereg/dial_warmup.yaml", ["sweep.grid.seed=[1]"],
                         schema=CONFIG_SCHEMA)
    assert sorted(r.name for r in runs) == sorted(f"head_level-{l}_s1" for l in range(7))


STUB_PYTHON = """#!/bin/bash
# Stands in for Python: every call is only recorded.
echo "CALL $*" >> "$CALLS"
"""


def reproduce_prereg(tmp_path, **env):
    """``reproduce.sh prereg`` with Python stubbed out: the sweep commands it would run."""
    stub, calls, pilots = tmp_path / "python", tmp_path / "calls", tmp_path / "pilots"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    pilots.mkdir()
    write_json(pilots / "knee_darcy.json", {"passed": True})
    base = {"PATH": "/usr/bin:/bin", "ORCA_PYTHON": str(stub), "CALLS": str(calls), "PILOTS_DIR": str(pilots),
            "PREREG_TASKS": "darcy tones"}
    done = subprocess.run(["bash", "scripts/reproduce.sh", "prereg", str(tmp_path / "out")], cwd=REPO_ROOT,
                          env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tones: no passing pilot" in done.stdout  # tones has no verdict in PILOTS_DIR: skipped
    return calls.read_text().splitlines() if calls.exists() else []


def test_prereg_runs_warmups_then_knees_of_released_tasks_only(tmp_path):
    calls = reproduce_prereg(tmp_path)
    assert [c.split()[4] for c in calls] == ["configs/experiments/prereg/darcy_warmup.yaml",
                                             "configs/experiments/prereg/darcy_knee.yaml"]
    assert all("--pack 24" in c and "sweep.grid.seed" not in c for c in calls)


def test_prereg_seeds_and_phases(tmp_path):
    calls = reproduce_prereg(tmp_path, PREREG_SEEDS="0 2", PREREG_PHASE="knees", PACK="7",
                             PACK_OVERRIDES="train.compile=true")
    assert calls == ["CALL -m orca sweep configs/experiments/prereg/darcy_knee.yaml --pack 7 sweep.grid.seed=[0,2] "
                     "train.compile=true"]
    (tmp_path / "calls").unlink()
    shutil.rmtree(tmp_path / "pilots")
    calls = reproduce_prereg(tmp_path, PREREG_PHASE="warmups")
    assert calls == ["CALL -m orca sweep configs/experiments/prereg/darcy_warmup.yaml --pack 24"]
