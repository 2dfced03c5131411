"""The pre-registered gap profiles and placebo comparison as reproduce.sh runs them (parts ``prereg_gaps`` and
``prereg_placebo``): the commands they issue (Python stubbed out, in a copy of the scripts and sweep files),
that their tasks are the knee sweeps' tasks, that finished steps are skipped, and, on the CPU at toy size,
that the stage-2 maps of a reused gap profile become exactly the map files the placebo sweeps name."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from orca.cli import CONFIG_SCHEMA
from orca.config import config_dict, load_config
from orca.runs import REPO_ROOT, write_json
from orca.sweep import load_sweep
from rank_estimation.allocate import swin_linear_costs
from rank_estimation.evidence import load_runs, prereg_inputs
from rank_estimation.placebo import adapter_params
from rank_estimation.preregistered import PLACEBO_ARMS, PLACEBO_KEYS, TASK_KEYS
from tests.conftest import load_script, prereg_shell

PREREG = REPO_ROOT / "configs/experiments/prereg"
KNEE_FILE = {"darcy": "darcy", "tones": "tones", "digits": "digits", "natural_patches": "patches",
             "fractal_heldout": "heldout"}  # the other keys are dial levels: dial_knee.yaml


def task_args(key: str) -> list:
    return prereg_shell(f'prereg_task {key}; printf "%s\\n" "${{task_args[@]}}"').splitlines()


def knee_run_cfg(key: str):
    """The config of the knee sweep's r = 8, seed 0 run of ``key``'s task."""
    name = KNEE_FILE.get(key, "dial")
    _, runs = load_sweep(PREREG / f"{name}_knee.yaml", schema=CONFIG_SCHEMA)
    sfx = f"_level-{key[4:]}" if name == "dial" else ""
    return next(r.cfg for r in runs if r.name == f"lora_r8{sfx}_s0")


def test_every_analysed_task_has_a_gap_profile_of_its_knee_sweeps_data():
    keys = prereg_shell("echo $PREREG_ALL_KEYS").split()
    assert sorted(keys) == sorted(TASK_KEYS) and keys[:2] == list(PLACEBO_KEYS)
    for key in keys:
        cfg = load_config(str(PREREG / "gaps.yaml"), task_args(key) + [f"run_dir=results/runs/prereg_gaps/{key}"],
                          schema=CONFIG_SCHEMA)
        assert config_dict(cfg)["task"] == config_dict(knee_run_cfg(key))["task"], key
        assert cfg.name == "prereg_gaps"  # the experiment name rank_estimation.evidence reads gaps from


def test_render_device_moves_only_the_fractal_rendering():
    """RENDER_DEVICE=cpu: the fractal tasks' options name the CPU as render device, nothing else changes."""
    show = 'prereg_task {}; printf "%s\\n" "${{task_args[@]}}"'
    cuda = prereg_shell(show.format("dial3")).splitlines()
    cpu = prereg_shell("RENDER_DEVICE=cpu " + show.format("dial3")).splitlines()
    assert cuda == ["task.name=fractal_dial", "task.options={level: 3, cache: true, device: cuda}"]
    assert cpu == [cuda[0], cuda[1].replace("cuda", "cpu")]
    assert prereg_shell("RENDER_DEVICE=cpu " + show.format("darcy")).splitlines() == ["task.name=darcy"]


def test_an_unknown_task_key_is_refused():
    done = subprocess.run(["bash", "-c", "source scripts/_prereg.sh; prereg_task dial7"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no pre-registered task 'dial7'; choose one of: darcy dial3 ")


def placebo_grid(key: str) -> list:
    return yaml.safe_load((PREREG / f"placebo_{key}.yaml").read_text())["sweep"]["grid"]["adapter.rank_map"]


@pytest.mark.parametrize("key", PLACEBO_KEYS)
def test_placebo_budgets_are_the_preregistered_uniform_rank_budgets(key):
    """Uniform r = 2, 8, 32 on the `all` module set of the fractal body (results/preregistration.md, 5)."""
    budgets = [int(b) for b in prereg_shell(f"placebo_budgets {key}").split()]
    per_rank = sum(swin_linear_costs(embed_dim=64, depths=(2, 2, 6, 2), targets="all").values())
    assert budgets == [2 * per_rank, 8 * per_rank, 32 * per_rank] == [99584, 398336, 1593344]
    assert prereg_shell(f"placebo_maps_of {key}").split() == placebo_grid(key)


@pytest.mark.parametrize("key", PLACEBO_KEYS)
def test_placebo_warmups_are_the_knee_sweeps_warmups_of_the_same_task(key, tmp_path):
    """The directories the part checks are the warm-up sweep's runs that model.warmup_from finds for each seed."""
    warmup = PREREG / f"{KNEE_FILE.get(key, 'dial')}_warmup.yaml"
    spec, warmups = load_sweep(warmup, schema=CONFIG_SCHEMA)
    _, placebo = load_sweep(PREREG / f"placebo_{key}.yaml", schema=CONFIG_SCHEMA)
    by_dir = {f"{spec.output_dir}/{spec.table}/{r.name}": r.cfg for r in warmups}
    missing = prereg_shell(f"placebo_warmups_missing {key}").split()
    seeds = sorted({r.cfg.seed for r in placebo})
    assert len(missing) == len(seeds) == 3
    for run in placebo:
        assert run.cfg.model.warmup_from == f"{spec.output_dir}/{spec.table}"
        want = [d for d in missing if by_dir[d].seed == run.cfg.seed]
        assert len(want) == 1 and config_dict(by_dir[want[0]])["task"] == config_dict(run.cfg)["task"]


# --------------------------------------------------------------------------- the parts, Python stubbed out
STUB_PYTHON = """#!/bin/bash
# Stands in for Python: records every call; a stage-2 call leaves a finished run in its run_dir and
# placebo_maps.py its four arms' files per budget, as the real ones would (unless STUB_FAIL says not).
echo "CALL $*" >> "$CALLS"
[ -n "${STUB_FAIL:-}" ] && exit 1
if [ "$1 $2 $3" = "-m orca stage2" ]; then
  for a in "$@"; do case $a in run_dir=*)
    mkdir -p "${a#run_dir=}" && printf '{\\n  "status": "finished"\\n}\\n' > "${a#run_dir=}/summary.json";; esac; done
elif [ "$1" = scripts/placebo_maps.py ]; then
  out=$3; mkdir -p "$out"; shift 3; while [ "$1" != --budgets ]; do shift; done; shift
  for b in "$@"; do for arm in stage2 uniform shuffled depth; do echo '{}' > "$out/${arm}_b$b.json"; done; done
fi
"""


@pytest.fixture
def tree(tmp_path):
    """A copy of the scripts and the pre-registered sweep files: the parts' results/ land in it."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("reproduce.sh", "_env.sh", "_prereg.sh", "stage1.sh", "stage2.sh"):
        shutil.copy(REPO_ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copytree(PREREG, root / "configs/experiments/prereg")
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return root


def reproduce(root: Path, part: str, **env) -> tuple:
    """``reproduce.sh PART`` in ``root`` with Python stubbed: (stdout, the Python calls it made)."""
    calls = root.parent / "calls"
    calls.unlink(missing_ok=True)
    base = {"PATH": "/usr/bin:/bin", "ORCA_PYTHON": str(root.parent / "python"), "CALLS": str(calls)}
    done = subprocess.run(["bash", "scripts/reproduce.sh", part, str(root.parent / "out")], cwd=root,
                          env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout, calls.read_text().splitlines() if calls.exists() else []


def summary(run_dir: Path, status: str) -> None:
    write_json(run_dir / "summary.json", {"status": status})


def stage2_call(*args: str) -> str:
    return "CALL -m orca stage2 --config configs/experiments/prereg/gaps.yaml " + " ".join(args)


def test_prereg_gaps_runs_each_missing_profile_once(tree):
    gaps = tree / "results/runs/prereg_gaps"
    summary(gaps / "tones", "finished")
    summary(gaps / "digits", "failed")        # a failed or killed profile is measured again
    summary(gaps / "dial5", "running")
    out, calls = reproduce(tree, "prereg_gaps")
    keys = [c.rsplit("run_dir=results/runs/prereg_gaps/", 1)[1] for c in calls]
    assert keys == [k for k in prereg_shell("echo $PREREG_ALL_KEYS").split() if k != "tones"]
    assert calls[0] == stage2_call("task.name=darcy run_dir=results/runs/prereg_gaps/darcy")
    assert calls[1] == stage2_call("task.name=fractal_dial task.options={level: 3, cache: true, device: cuda}",
                                   "run_dir=results/runs/prereg_gaps/dial3")
    assert calls[-1] == stage2_call("task.name=fractal_heldout task.options={cache: true, device: cuda}",
                                    "run_dir=results/runs/prereg_gaps/fractal_heldout")
    assert "(tones: gap profile finished in results/runs/prereg_gaps/tones)" in out
    # called again, everything is there: nothing runs
    out, calls = reproduce(tree, "prereg_gaps")
    assert calls == []
    _, calls = reproduce(tree, "prereg_gaps", PREREG_KEYS="dial6 darcy")
    assert calls == []


def test_prereg_placebo_waits_for_the_gap_profile(tree):
    out, calls = reproduce(tree, "prereg_placebo")
    assert calls == []
    assert ("(darcy: no finished gap profile in results/runs/prereg_gaps/darcy; run the prereg_gaps part first)"
            in out)
    assert "(dial3: no finished gap profile" in out


def test_prereg_placebo_refuses_a_task_without_a_placebo_sweep(tree):
    summary(tree / "results/runs/prereg_gaps/darcy", "finished")
    done = subprocess.run(["bash", "scripts/reproduce.sh", "prereg_placebo", str(tree.parent / "out")], cwd=tree,
                          env={"PATH": "/usr/bin:/bin", "ORCA_PYTHON": str(tree.parent / "python"),
                               "CALLS": str(tree.parent / "calls"), "PLACEBO_KEYS": "tones darcy"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and not (tree.parent / "calls").exists()
    assert done.stderr == ("error: PLACEBO_KEYS names 'tones', which has no placebo sweep "
                           "configs/experiments/prereg/placebo_tones.yaml; the pre-registered ones are darcy and dial3\n")


def test_prereg_placebo_maps_then_says_which_warmups_are_missing_then_sweeps(tree):
    summary(tree / "results/runs/prereg_gaps/dial3", "finished")
    budgets = (99584, 398336, 1593344)
    s2 = [f"results/runs/prereg_stage2/dial3_b{b}" for b in budgets]
    out, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="dial3")
    task = "task.name=fractal_dial task.options={level: 3, cache: true, device: cuda}"
    assert calls == [stage2_call(task, f"name=prereg_stage2 rank.allocate=true rank.budget={b}",
                                 f"rank.gaps_from=results/runs/prereg_gaps/dial3 run_dir={d}")
                     for b, d in zip(budgets, s2)] + \
        [f"CALL scripts/placebo_maps.py --out results/runs/placebo_maps/dial3 --stage2 {' '.join(s2)} "
         f"--budgets {' '.join(map(str, budgets))}"]
    assert sorted(str(p.relative_to(tree)) for p in (tree / "results/runs/placebo_maps/dial3").iterdir()) == \
        sorted(placebo_grid("dial3"))
    warmups = [f"results/runs/warmup_dial/head_level-3_s{s}" for s in range(3)]
    assert (f"(dial3: the placebo runs load the knee sweep's warm-ups, and these have no checkpoint: "
            f"{' '.join(warmups)};") in out
    assert "PREREG_TASKS=dial PREREG_PHASE=warmups" in out
    # two of three warm-ups arrive: still no sweep, and only the missing one is named
    for w in warmups[:2]:
        (tree / w / "ckpt").mkdir(parents=True)
        (tree / w / "ckpt/best.pt").write_bytes(b"")
    out, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="dial3")
    assert calls == [] and f"have no checkpoint: {warmups[2]};" in out
    (tree / warmups[2] / "ckpt").mkdir(parents=True)
    (tree / warmups[2] / "ckpt/best.pt").write_bytes(b"")
    _, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="dial3", PACK="12",
                         PACK_OVERRIDES="train.compile=true train.compile_backend=cudagraphs")
    assert calls == ["CALL -m orca sweep configs/experiments/prereg/placebo_dial3.yaml --pack 12 "
                     "train.compile=true train.compile_backend=cudagraphs"]


def test_prereg_placebo_redoes_only_what_is_missing(tree):
    summary(tree / "results/runs/prereg_gaps/darcy", "finished")
    summary(tree / "results/runs/prereg_stage2/darcy_b99584", "finished")
    summary(tree / "results/runs/prereg_stage2/darcy_b398336", "failed")
    _, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="darcy")
    assert [c.split("rank.budget=")[1].split()[0] for c in calls if "orca stage2" in c] == ["398336", "1593344"]
    assert sum("placebo_maps.py" in c for c in calls) == 1
    # one map file lost: the maps are written again (all of them, from the finished stage-2 runs)
    (tree / "results/runs/placebo_maps/darcy/depth_b398336.json").unlink()
    _, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="darcy")
    assert len(calls) == 1 and calls[0].startswith("CALL scripts/placebo_maps.py --out results/runs/placebo_maps/darcy")


def test_prereg_placebo_stops_a_task_whose_stage2_map_failed(tree):
    summary(tree / "results/runs/prereg_gaps/darcy", "finished")
    out, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="darcy", STUB_FAIL="1")
    assert len(calls) == 3 and all("orca stage2" in c for c in calls)
    assert "(darcy: a stage-2 map did not finish; the maps and the sweep wait for it)" in out


# --------------------------------------------------------------------------- the real thing at toy size (CPU)
TOY = ["model.weights=none", "task.options.resolution=41", "task.options.subsample=4", "task.options.n_train=24",
       "task.options.n_val=8", "task.options.n_test=8", "task.options.workers=1", "train.device=cpu",
       "rank.n_source=8", "rank.n_target=8", "rank.source_options.num_classes=4", "rank.metrics=[mmd_source]",
       "rank.boot_metrics=[mmd_source]", "rank.n_boot=2"]


def test_gaps_from_maps_become_the_files_the_placebo_sweep_names(tree, tmp_path):
    """The part's own stage-2 and placebo_maps commands for darcy, run for real at toy size (random body of the
    fractal architecture, so the pre-registered budgets fit): the map files are exactly the sweep's grid, every
    arm has the stage-2 map's parameter count, and the analysis reads one gap for darcy and the arms' names."""
    from rank_estimation.stage import run_stage2
    placebo_maps = load_script("placebo_maps.py")

    _, gap_calls = reproduce(tree, "prereg_gaps", PREREG_KEYS="darcy")   # the stub leaves it finished
    _, calls = reproduce(tree, "prereg_placebo", PLACEBO_KEYS="darcy")
    runs = tmp_path / "runs"

    def rooted(args):
        return [a.replace("results/runs/", f"{runs}/") for a in args]

    toy = TOY + [f"task.data_root={tmp_path / 'data'}"]
    for call in gap_calls + calls[:3]:
        run_stage2(load_config(str(PREREG / "gaps.yaml"), rooted(call.split("gaps.yaml ", 1)[1].split()) + toy,
                               schema=CONFIG_SCHEMA))
    placebo_maps.main(rooted(calls[3].split()[2:]))

    written = sorted(p.name for p in (runs / "placebo_maps/darcy").iterdir())
    grid = placebo_grid("darcy")
    assert {str(Path(g).parent) for g in grid} == {"results/runs/placebo_maps/darcy"}
    assert written == sorted(Path(g).name for g in grid)
    for g in grid:
        arm, _, budget = Path(g).stem.rpartition("_b")    # how rank_estimation.evidence reads a placebo run
        assert arm in PLACEBO_ARMS and budget.isdigit()
    costs = swin_linear_costs(embed_dim=64, depths=(2, 2, 6, 2), targets="all")
    for budget in prereg_shell("placebo_budgets darcy").split():
        maps = {arm: json.loads((runs / f"placebo_maps/darcy/{arm}_b{budget}.json").read_text()) for arm in PLACEBO_ARMS}
        params = {arm: m["params"] for arm, m in maps.items()}
        assert len(set(params.values())) == 1 and abs(params["stage2"] - int(budget)) <= 0.01 * int(budget), params
        assert all(list(m["rank_map"]) == list(costs) for m in maps.values())  # one module set: `all`
        assert params["uniform"] == adapter_params(maps["uniform"]["rank_map"], costs)
        assert maps["stage2"]["stage2_run"] == f"{runs}/prereg_stage2/darcy_b{budget}"
    # the stage-2 maps at the budgets are not read as gap profiles: one darcy gap, the measured one
    _, gaps, _ = prereg_inputs(runs, "any", "mmd_source")
    profile = json.loads((runs / "prereg_gaps/darcy/gaps.json").read_text())
    blocks = [layer for layer in profile["layers"] if layer != "embed"]
    assert list(gaps) == ["darcy"]
    assert gaps["darcy"]["value"] == pytest.approx(np.mean([profile["values"][b]["mmd_source"]["value"] for b in blocks]))
    # ... and none of them enters the exploratory analysis' task profiles (another metric, other embedders)
    assert load_runs(runs, "test")[1] == {}


def test_prereg_stage1_uses_the_same_tasks_and_skips_finished_steps(tree):
    summary(tree / "results/runs/prereg_stage1/darcy", "finished")
    summary(tree / "results/runs/prereg_stage1/dial2", "failed")
    _, calls = reproduce(tree, "prereg_stage1")
    dial = "task.name=fractal_dial task.options={level: %d, cache: true, device: cuda}"
    assert calls[:5] == [
        stage2_call("task.name=darcy model.embedder_from=results/runs/prereg_stage1/darcy",
                    "run_dir=results/runs/prereg_gaps_aligned/darcy").replace("gaps.yaml", "gaps_aligned.yaml"),
        f"CALL -m orca stage1 --config configs/experiments/prereg/stage1.yaml {dial % 2} "
        "run_dir=results/runs/prereg_stage1/dial2",
        stage2_call(dial % 2, "model.embedder_from=results/runs/prereg_stage1/dial2",
                    "run_dir=results/runs/prereg_gaps_aligned/dial2").replace("gaps.yaml", "gaps_aligned.yaml"),
        f"CALL -m orca stage1 --config configs/experiments/prereg/stage1.yaml {dial % 5} "
        "run_dir=results/runs/prereg_stage1/dial5",
        stage2_call(dial % 5, "model.embedder_from=results/runs/prereg_stage1/dial5",
                    "run_dir=results/runs/prereg_gaps_aligned/dial5").replace("gaps.yaml", "gaps_aligned.yaml")]
    assert [c.split()[4] for c in calls[5:]] == [f"configs/experiments/prereg/{n}_aligned_{k}.yaml"
                                                 for n in ("darcy", "dial") for k in ("warmup", "knee")]
    assert all(c.endswith("--pack 24") for c in calls[5:])  # no PACK_OVERRIDES, nothing added


def test_pack_carries_the_placebo_maps_with_the_finished_runs(tree):
    summary(tree / "results/runs/prereg_stage2/darcy_b99584", "finished")
    (tree / "results/runs/prereg_stage2/darcy_b99584/ckpt").mkdir()
    (tree / "results/runs/prereg_stage2/darcy_b99584/ckpt/last.pt").write_bytes(b"x")
    write_json(tree / "results/runs/placebo_maps/darcy/depth_b99584.json", {})
    (tree / "results/runs/placebo_maps/darcy/notes.txt").write_text("not a map")
    out, calls = reproduce(tree, "pack")
    listed = subprocess.run(["tar", "tzf", str(tree.parent / "out/runs.tgz")], capture_output=True, text=True,
                            check=True).stdout.split()
    assert sorted(p for p in listed if not p.endswith("/")) == [
        "results/runs/placebo_maps/darcy/depth_b99584.json", "results/runs/prereg_stage2/darcy_b99584/summary.json"]
    assert calls == [] and "1 run directories in" in out
