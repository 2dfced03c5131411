"""Products between stages: each stage prints the exact next command with everything it made, and stage 2
and 3 refuse an embedder or rank map made for another task, body, weights or embedder, naming both sides,
before they write anything."""
from __future__ import annotations

import functools
import json
import os
import shlex
import shutil

import pytest

from orca.cli import CONFIG_SCHEMA, main
from orca.config import load_config as load_core_config
from orca.errors import UsageError
from orca.train import run_stage3
from rank_estimation.stage import run_stage2
from tests.conftest import tiny_overrides_under

#: A run of a stage-2 config keeps its ``rank`` section: read it with every stage's sections, as the CLI does.
load_config = functools.partial(load_core_config, schema=CONFIG_SCHEMA)

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE1 = ["align.source=fractal", "align.source_options={num_points: 5000}", "align.n_source=40",
          "align.n_clusters=3", "align.epochs=2"]
STAGE2 = ["rank.n_source=40", "rank.n_boot=0", "rank.metrics=[mmd]", "rank.budget=20000", "rank.r_max=16",
          "rank.n_chains=2", "rank.n_sweeps=40", "rank.burn_in=20"]
FAST3 = ["train.epochs=1", "train.max_steps_per_epoch=1"]


def next_line(out: str, stage: str) -> list:
    """The argv (after ``python -m orca``) of the ``[stage] next:`` line."""
    line = next(x for x in out.splitlines() if x.startswith(f"[{stage}] next: "))
    argv = shlex.split(line[len(f"[{stage}] next: "):])
    assert argv[:3] == ["python", "-m", "orca"], line
    return argv[3:]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage 1, then stage 2 through the aligned embedder, each run by the command the previous one printed."""
    import io
    from contextlib import redirect_stdout

    tmp = tmp_path_factory.mktemp("chain")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["stage1", *tiny_overrides_under(tmp), *STAGE1, *STAGE2, f"run_dir={tmp / 'stage1'}"]) == 0
    to_stage2 = next_line(out.getvalue(), "stage1")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(to_stage2) == 0
    to_stage3 = next_line(out.getvalue(), "stage2")
    stage2 = next(x for x in out.getvalue().splitlines() if x.startswith("[stage2] run directory: "))
    return {"tmp": tmp, "stage1": tmp / "stage1", "stage2": stage2.split(": ", 1)[1], "to_stage2": to_stage2,
            "to_stage3": to_stage3}


def runs_under(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_printed_next_commands_carry_every_product(chain, capsys):
    stage1 = str(chain["stage1"])
    assert chain["to_stage2"][:3] == ["stage2", "--config", f"{stage1}/config.yaml"]
    assert f"model.embedder_from={stage1}" in chain["to_stage2"] and chain["to_stage2"][-1] == "run_dir=null"
    to3 = chain["to_stage3"]
    rank_map = f"{chain['stage2']}/rank_map.json"
    assert to3[:3] == ["stage3", "--config", f"{chain['stage2']}/config.yaml"]
    assert f"adapter.rank_map={rank_map}" in to3 and f"model.embedder_from={stage1}" in to3
    assert json.loads(open(rank_map).read())["stage3"]["command"].endswith(" ".join(to3[3:]))
    assert main([*to3, *FAST3]) == 0  # the printed command runs (shortened to one step)
    out = capsys.readouterr().out
    run3 = next(x for x in out.splitlines() if x.startswith("[stage3] run directory: ")).split(": ", 1)[1]
    cfg3 = load_config(f"{run3}/config.yaml")
    assert cfg3.model.embedder_from == stage1 and cfg3.adapter.rank_map == rank_map
    assert cfg3.task.name == "darcy" and json.loads(open(f"{run3}/summary.json").read())["status"] == "finished"


def test_stage3_refuses_aligned_rank_map_without_embedder_from(chain):
    to3 = chain["to_stage3"]
    cfg = load_config(to3[2], [*[a for a in to3[3:] if not a.startswith("model.embedder_from=")],
                               "model.embedder_from=null", *FAST3])
    before = runs_under(cfg.output_dir)
    with pytest.raises(UsageError) as err:
        run_stage3(cfg)
    assert str(err.value) == (
        f"that rank map was measured through the aligned embedder of {chain['stage1']}, but model.embedder_from "
        f"is not set, so stage 3 would train the unaligned one, adapter.rank_map={chain['stage2']}/rank_map.json, "
        f"add model.embedder_from={chain['stage1']}")
    assert runs_under(cfg.output_dir) == before


def doctored(src, dst, name, **changes):
    """A copy of run directory ``src`` whose JSON file ``name`` records other provenance facts."""
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    (data["provenance"] if "provenance" in data else data).update(changes)
    (dst / name).write_text(json.dumps(data))
    return dst


def test_stage3_refuses_rank_map_of_another_task_or_embedder(chain, tmp_path):
    to3 = chain["to_stage3"]
    other = doctored(chain["stage2"], tmp_path / "s2", "rank_map.json", task="cifar10")
    cfg = load_config(to3[2], [*to3[3:], f"adapter.rank_map={other / 'rank_map.json'}", *FAST3])
    before = runs_under(cfg.output_dir)
    with pytest.raises(UsageError, match=r"^that rank map was measured on another setup \(task 'cifar10' there, "
                                         r"'darcy' here\), adapter.rank_map=.*s2/rank_map.json, use a rank map of"):
        run_stage3(cfg)
    # the same rank map with another aligned embedder (a second stage-1 run of the same setup) is refused too
    elsewhere = shutil.copytree(chain["stage1"], tmp_path / "elsewhere")
    cfg = load_config(to3[2], [*to3[3:], f"model.embedder_from={elsewhere}", *FAST3])
    with pytest.raises(UsageError, match=r"target_embedder '.*stage1' there, '.*elsewhere' here"):
        run_stage3(cfg)
    assert runs_under(cfg.output_dir) == before


@pytest.mark.parametrize("change,message", [
    ({"task": "cifar10"}, r"task 'cifar10' there, 'darcy' here"),
    ({"body": "swin_small_patch4_window7_224"}, r"body 'swin_small_patch4_window7_224' there, "
                                                r"'swin_tiny_patch4_window7_224' here"),
    ({"seed": 7}, r"seed 7 there, 0 here"),  # a random body (model.weights=none) is another body under another seed
])
def test_stage2_and_stage3_refuse_embedder_of_another_setup(chain, tmp_path, change, message):
    other = doctored(chain["stage1"], tmp_path / "s1", "summary.json", **change)
    for stage, run in (("stage2", run_stage2), ("stage3", run_stage3)):
        cfg = load_config(f"{chain['stage1']}/config.yaml", [f"model.embedder_from={other}", "run_dir=null", *FAST3])
        before = runs_under(cfg.output_dir)
        with pytest.raises(UsageError, match=rf"^that embedder was aligned on another setup \({message}\), "
                                             rf"model.embedder_from=.*s1, use a stage-1 run of this task"):
            run(cfg)
        assert runs_under(cfg.output_dir) == before, stage


def test_stage2_that_fails_says_so_in_its_summary(chain, tmp_path, monkeypatch):
    import rank_estimation.stage as stage

    def broken(*_, **__):
        raise RuntimeError("allocation broke")

    monkeypatch.setattr(stage, "allocate_and_write", broken)
    cfg = load_config(chain["to_stage2"][2], [*chain["to_stage2"][3:], f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(RuntimeError):
        run_stage2(cfg)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == "RuntimeError: allocation broke"
    assert summary["stage"] == "stage2" and summary["target_embedder"] == str(chain["stage1"])


def test_a_run_reports_the_commit_it_started_from(tmp_path, monkeypatch):
    """The commit is read when the run directory is made and kept for the process: a commit made
    while a run works (its summary is written at the end) is not the one it reports."""
    from orca import runs

    runs._git_at_first_call.cache_clear()
    monkeypatch.setenv("ORCA_GIT_COMMIT", "a" * 40)
    runs.RunDir(tmp_path / "run")
    monkeypatch.setenv("ORCA_GIT_COMMIT", "b" * 40)  # the checkout moves on while the run works
    try:
        assert runs.git_info() == {"commit": "a" * 40, "dirty": False, "source": "ORCA_GIT_COMMIT"}
        runs.git_info()["commit"] = "changed"  # a caller's copy: the process's record stays
        assert runs.git_info()["commit"] == "a" * 40
    finally:
        runs._git_at_first_call.cache_clear()  # later tests in this process read the real checkout
