"""The sweep driver: grid expansion, resumable runs, dry runs, the GPU worker pool, config errors.

Real stage-3 runs happen only in ``test_sweep_runs_then_skips`` (4 tiny runs, ~20 s on one core);
the pool test swaps the training command for a one-line Python script, so it checks the queue and
the GPU assignment without training anything.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from orca.config import config_dict
from orca import sweep as sweep_mod
from orca.runs import usable_cpus
from orca.schema import ConfigError
from rank_estimation.config import Stage2Config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One Darcy cache for the module: the tiny data is generated once, not per test."""
    return tmp_path_factory.mktemp("data")


def tiny_sweep(tmp_path: Path, data_root: Path, sweep_section: str) -> Path:
    """A sweep file whose runs take seconds on one CPU core (the tiny_overrides settings as YAML)."""
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: test
        task:
          name: darcy
          data_root: {data_root}
          options: {{resolution: 41, subsample: 4, n_train: 16, n_val: 8, n_test: 8, workers: 1}}
        model:
          body: swin_tiny_patch4_window7_224
          weights: none
          img_size: 32
          body_kwargs: {{embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 2}}
        train: {{epochs: 1, warmup_epochs: 0.5, batch_size: 8, device: cpu, log_every: 1}}
        adapter: {{method: lora, targets: attn}}
        """) + textwrap.dedent(sweep_section).replace("OUT", str(tmp_path / "runs")))
    return path


GRID_2x2 = """\
    sweep:
      table: table2
      output_dir: OUT
      grid: {adapter.rank: [1, 2], seed: [0, 1]}
    """


def test_sweep_runs_then_skips(tmp_path, data_root, monkeypatch, capsys):
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    assert sweep_mod.run_sweep(path, gpus=0) == []
    names = ["lora_r1_s0", "lora_r1_s1", "lora_r2_s0", "lora_r2_s1"]
    out_dir = tmp_path / "runs" / "table2"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)
    for name in names:
        summary = json.loads((out_dir / name / "summary.json").read_text())
        record = json.loads((out_dir / name / "sweep.json").read_text())
        assert summary["seed"] == record["seed"] == int(name[-1])
        assert record["table"] == "table2" and record["row"] == name[:-3] and record["rank"] == int(name[6])
    # the rank really reached the model: rank-2 LoRA has twice rank-1's adapter parameters
    adapters = {n: json.loads((out_dir / n / "summary.json").read_text())["params"]["adapters"] for n in names}
    assert adapters["lora_r2_s0"] == 2 * adapters["lora_r1_s0"] > 0
    mtimes = {n: (out_dir / n / "summary.json").stat().st_mtime_ns for n in names}

    # the tables read what the sweep wrote: Table 2's "LoRA r=1" row holds both seeds, linked
    from tests.test_tables import make_tables
    md, _, _ = make_tables.make_tables(tmp_path / "runs", tmp_path / "tables.md", None)
    (r1,) = [line for line in md.splitlines() if line.startswith("| LoRA r=1 |")]
    assert "(runs/table2/lora_r1_s0)" in r1 and "(runs/table2/lora_r1_s1)" in r1 and " ± " in r1

    # A second invocation must not train anything: stage 3 is replaced by a function that fails loudly.
    def must_not_run(cfg, *args, **kwargs):
        raise AssertionError(f"completed run {cfg.run_dir} was started again")

    monkeypatch.setattr("orca.train.run_stage3", must_not_run)
    assert sweep_mod.run_sweep(path, gpus=0) == []
    assert {n: (out_dir / n / "summary.json").stat().st_mtime_ns for n in names} == mtimes

    capsys.readouterr()
    (out_dir / "lora_r2_s1" / "summary.json").unlink()  # as if that run had been interrupted
    assert sweep_mod.run_sweep(path, dry_run=True) == []
    lines = capsys.readouterr().out.splitlines()
    assert "3 done, 1 pending" in lines[0]
    status = {Path(line.split()[1]).name: line.split()[0] for line in lines[1:]}
    assert status == {"lora_r1_s0": "done", "lora_r1_s1": "done", "lora_r2_s0": "done", "lora_r2_s1": "pending"}


FAKE_RUN = textwrap.dedent("""\
    import json, os, sys, pathlib
    run_dir = pathlib.Path(sys.argv[1])
    if run_dir.name.startswith("lora_r2"):
        sys.exit(3)  # a run that crashes
    (run_dir / "summary.json").write_text(json.dumps({"gpu": os.environ["CUDA_VISIBLE_DEVICES"],
                                                      "omp": os.environ.get("OMP_NUM_THREADS")}))
    """)


def test_pool_one_gpu_per_run_and_failures_reported(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    failed = sweep_mod.run_sweep(path, gpus=2, poll_s=0.05,
                                 command=lambda run: [sys.executable, "-c", FAKE_RUN, str(run.run_dir)])
    out_dir = tmp_path / "runs" / "table2"
    assert sorted(run.name for run, _ in failed) == ["lora_r2_s0", "lora_r2_s1"]  # the sweep went on past them
    for run, log in failed:
        assert Path(log) == run.run_dir / "sweep.log"
    gpus = {n: json.loads((out_dir / n / "summary.json").read_text())["gpu"] for n in ("lora_r1_s0", "lora_r1_s1")}
    assert set(gpus.values()) <= {"0", "1"}
    # each run directory got the resolved config the subprocess would train from
    assert "run_dir: " + str(out_dir / "lora_r1_s0") in (out_dir / "lora_r1_s0" / "config.yaml").read_text()


def test_pool_runs_several_processes_per_gpu(tmp_path, data_root, monkeypatch):
    """--per-gpu 2 on one GPU: two slots, both on GPU 0, every run done once."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep_mod, "visible_devices", lambda n: ["0"])
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    fake = FAKE_RUN.replace("sys.exit(3)", "pass")  # every run succeeds here
    failed = sweep_mod.run_sweep(path, gpus=1, per_gpu=2, poll_s=0.05,
                                 command=lambda run: [sys.executable, "-c", fake, str(run.run_dir)])
    assert failed == []
    out_dir = tmp_path / "runs" / "table2"
    assert {json.loads((d / "summary.json").read_text())["gpu"] for d in out_dir.iterdir()} == {"0"}
    omp = {json.loads((d / "summary.json").read_text())["omp"] for d in out_dir.iterdir()}
    assert omp == {str(max(1, usable_cpus() // 2))}  # the CPUs shared by the 2 slots
    assert len(list(out_dir.iterdir())) == 4
    with pytest.raises(ValueError, match="per_gpu must be >= 1"):
        sweep_mod.run_sweep(path, gpus=1, per_gpu=0)


def test_run_directories_of_another_sweep_are_refused(tmp_path, data_root):
    """Same table and run names from another sweep file: an error, not its results taken as ours."""
    first = tiny_sweep(tmp_path, data_root, GRID_2x2)
    spec, runs = sweep_mod.load_sweep(first)
    for run in runs:
        sweep_mod.prepare(run, str(first), [])
    second = tmp_path / "other.yaml"
    second.write_text(first.read_text().replace("name: test", "name: other"))
    with pytest.raises(ConfigError, match=r"belongs to sweep .*tiny_sweep.yaml.*own sweep.table"):
        sweep_mod.run_sweep(second, dry_run=True)
    sweep_mod.run_sweep(first, dry_run=True)  # its own runs are fine


def test_visible_devices_respects_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert sweep_mod.visible_devices(2) == ["3", "5"]
    assert sweep_mod.visible_devices(0) == []
    with pytest.raises(ValueError, match="--gpus 4 but only 2"):
        sweep_mod.visible_devices(4)


def test_include_exclude_and_names(tmp_path, data_root):
    path = tiny_sweep(tmp_path, data_root, """\
        sweep:
          table: table3
          output_dir: OUT
          grid: {adapter.rank: [1, 2, 4], seed: [0, 1]}
          exclude: [{adapter.rank: [2, 4], seed: 1}]
          include:
            - {adapter.method: full, seed: [0, 1]}
            - {adapter.method: full, adapter.rank: 4, seed: 0}   # the rank does not change a full run: dropped
            - {adapter.rank: 1, train.lr: 0.01, seed: 0}
        """)
    spec, runs = sweep_mod.load_sweep(path)
    assert [r.name for r in runs] == ["lora_r1_s0", "lora_r1_s1", "lora_r2_s0", "lora_r4_s0",
                                      "full_s0", "full_s1", "lora_r1_lr-0.01_s0"]
    assert runs[-1].cfg.train.lr == 0.01 and runs[-1].row == "lora_r1_lr-0.01"
    assert all(Path(r.cfg.run_dir).parent == tmp_path / "runs" / "table3" for r in runs)
    # command-line overrides reach every run; sweep.* overrides edit the sweep section
    _, runs = sweep_mod.load_sweep(path, ["train.epochs=3", "sweep.grid={seed: [5]}", "sweep.include=[]"])
    assert [(r.name, r.cfg.train.epochs) for r in runs] == [("lora_r8_s5", 3)]


@pytest.mark.parametrize("section, message", [
    ("sweep:\n  gird: {seed: [0]}\n", "unknown config key 'sweep.gird'; did you mean 'grid'?"),
    ("sweep:\n  grid: {adapter.rnak: [1]}\n", "unknown config key 'adapter.rnak'; did you mean 'rank'?"),
    ("sweep:\n  grid: {seed: [0]}\n  exclude: [{adapter.rnk: 1}]\n", "'adapter.rnk' is not a config key; did you mean 'rank'?"),
    ("sweep:\n  grid: {seed: [0]}\n  require: [model.embedder_from]\n", "needs model.embedder_from="),
    ("sweep:\n  table: table2\n", "needs a non-empty sweep.grid"),
])
def test_bad_sweep_files_name_the_key(tmp_path, data_root, section, message):
    path = tiny_sweep(tmp_path, data_root, section)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        sweep_mod.load_sweep(path)


def test_cli_reports_config_errors_without_traceback(tmp_path, data_root, capsys):
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    assert sweep_mod.main([str(path), "--dry-run", "sweep.tabel=x"]) == 2
    assert "did you mean 'table'?" in capsys.readouterr().err


@pytest.mark.parametrize("name, n_runs", [("table1_smallgap", 6), ("table2_darcy_attn", 17),
                                          ("table3_darcy_all", 22), ("table4_darcy_otdd", 15),
                                          ("ranks_patches", 18), ("ranks_heldout", 18),
                                          ("ranks_digits", 18), ("ranks_tones", 18)])
def test_experiment_sweeps_expand(name, n_runs):
    """The committed sweep files load, and hold 3 seeds where the brief asks for them."""
    spec, runs = sweep_mod.load_sweep(REPO / "configs/experiments" / f"{name}.yaml",
                                      ["model.embedder_from=results/runs/table4/stage1_otdd_s0"], Stage2Config)
    assert len(runs) == n_runs and spec.table == (name if name.startswith("ranks") else name[:6])
    seeds = {}
    for run in runs:
        seeds.setdefault(run.row, set()).add(run.cfg.seed)
    assert seeds["full"] == {0, 1, 2}
    if name != "table1_smallgap":
        assert seeds["lora_r1"] == seeds["lora_r8"] == seeds["lora_r64"] == {0, 1, 2} and seeds["lora_r2"] == {0}
    # the reduced recipe the sweep files state: 5 epochs on held-out fractals, 10 elsewhere; eager
    assert all(r.cfg.train.epochs == (5 if name in ("table1_smallgap", "ranks_heldout") else 10) for r in runs)
    assert not any(r.cfg.train.compile for r in runs)
    if name in ("table3_darcy_all", "ranks_patches", "ranks_heldout", "ranks_digits", "ranks_tones"):  # one recipe
        assert seeds["head"] == {0, 1, 2}
        assert all(r.cfg.adapter.targets == "blocks" and r.cfg.adapter.train_embedder for r in runs)  # the 96 block Linears they ran on
    # The seed's ranks above the body's narrowest stage (64) run with full rank there, 1 seed each.
    big = {128: {"table2_darcy_attn", "table3_darcy_all"}, 256: {"table2_darcy_attn"}}
    for rank, tables in big.items():
        hits = [r for r in runs if r.cfg.adapter.method == "lora" and r.cfg.adapter.rank == rank]
        assert len(hits) == (name in tables) and all(r.cfg.adapter.clip_rank and r.cfg.seed == 0 for r in hits)


def test_interrupted_run_fails_then_resumes(tmp_path, data_root, monkeypatch, capsys):
    """A run killed mid-epoch is reported as failed; the next invocation resumes it from ckpt/last.pt."""
    import orca.train

    path = tiny_sweep(tmp_path, data_root, """\
        sweep:
          table: table2
          output_dir: OUT
          grid: {adapter.rank: [1]}
        """)
    real = orca.train.run_stage3

    def killed_at_step_3(cfg, run=None, on_step=None):  # 2 steps per epoch: dies inside epoch 2
        def kill(step):
            if step == 3:
                raise KeyError("simulated crash")
        return real(cfg, run, on_step=kill)

    monkeypatch.setattr("orca.train.run_stage3", killed_at_step_3)
    failed = sweep_mod.run_sweep(path, ["train.epochs=2"], gpus=0)
    run_dir = tmp_path / "runs" / "table2" / "lora_r1_s0"
    assert [(run.name, log) for run, log in failed] == [("lora_r1_s0", str(run_dir / "sweep_error.log"))]
    assert "simulated crash" in (run_dir / "sweep_error.log").read_text()
    assert (run_dir / "ckpt" / "last.pt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"  # not done: resumed below

    monkeypatch.setattr("orca.train.run_stage3", real)
    capsys.readouterr()
    assert sweep_mod.run_sweep(path, ["train.epochs=2"], gpus=0) == []
    assert "[stage3] resumed at epoch 1" in capsys.readouterr().out
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["steps"] == 4 and done["status"] == "finished"
    assert not (run_dir / "sweep_error.log").exists()


@pytest.mark.parametrize("name", ["adaptive_darcy", "adaptive_patches"])
def test_adaptive_sweeps_match_budgets(name):
    """Comparison (d): uniform, AdaLoRA and stage-2 maps at the same three budgets, 3 seeds each; a map's
    run is named after its stage-2 directory, and the sweep's grid is not inherited from a table."""
    spec, runs = sweep_mod.load_sweep(REPO / "configs/experiments" / f"{name}.yaml", schema=Stage2Config)
    assert spec.table == name and len(runs) == 27
    rows = {}
    for run in runs:
        rows.setdefault(run.row, set()).add(run.cfg.seed)
    budgets = (282624, 1177600, 3014656)
    expected = {f"lora_r{r}" for r in (6, 25, 64)} | {f"adalora_r{r}" for r in (6, 25, 64)} \
        | {f"lora_rankmap_rank_map-stage2-b{b}" for b in budgets}
    assert set(rows) == expected and all(seeds == {0, 1, 2} for seeds in rows.values())
    maps = {run.cfg.adapter.rank_map for run in runs if run.cfg.adapter.rank_map}
    assert maps == {f"results/runs/{name}/stage2_b{b}/rank_map.json" for b in budgets}
    assert all(run.cfg.adapter.targets == "blocks" for run in runs)  # the uniform runs' budgets: the 96 block Linears
    assert not any(run.cfg.train.compile for run in runs)


@pytest.mark.parametrize("name, method", [("body_evidence_darcy", "lora"), ("body_evidence_darcy_full", "full"),
                                          ("body_evidence_darcy_head", "head")])
def test_body_evidence_sweeps_pair_the_bodies(name, method):
    """Body evidence: each evidence sweep trains one method from the fractal and from a random body, 3 seeds each,
    with everything else equal."""
    spec, runs = sweep_mod.load_sweep(REPO / "configs/experiments" / f"{name}.yaml", schema=Stage2Config)
    assert spec.table == name and len(runs) == 6
    assert {(r.cfg.model.weights, r.cfg.seed) for r in runs} == {(w, s) for w in ("file", "none") for s in (0, 1, 2)}
    assert {r.cfg.adapter.method for r in runs} == {method} and {r.cfg.task.name for r in runs} == {"darcy"}
    assert {(r.cfg.train.epochs, r.cfg.train.batch_size, r.cfg.train.lr) for r in runs} == {(10, 16, 1e-3)}


def test_ddp_runs_take_gpu_groups_and_launch_under_torchrun(tmp_path, data_root, monkeypatch):
    """sweep.gpus_per_run=2 on 4 GPUs: two slots "0,1" and "2,3", each run launched by torchrun with
    2 processes; the CPU threads are shared by all 4 processes."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep_mod, "visible_devices", lambda n: ["0", "1", "2", "3"])
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    spec, runs = sweep_mod.load_sweep(path, ["sweep.gpus_per_run=2"])
    cmd = sweep_mod.stage3_command(runs[0])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["orca", "stage3", "--config", str(runs[0].run_dir / "config.yaml")]
    fake = FAKE_RUN.replace("sys.exit(3)", "pass")
    failed = sweep_mod.run_sweep(path, ["sweep.gpus_per_run=2"], poll_s=0.05,
                                 command=lambda run: [sys.executable, "-c", fake, str(run.run_dir)])
    assert failed == []
    out_dir = tmp_path / "runs" / "table2"
    summaries = [json.loads((d / "summary.json").read_text()) for d in out_dir.iterdir()]
    assert {s["gpu"] for s in summaries} <= {"0,1", "2,3"} and len(summaries) == 4
    assert {s["omp"] for s in summaries} == {str(max(1, usable_cpus() // 4))}
    assert json.loads((out_dir / "lora_r1_s0" / "sweep.json").read_text())["gpus_per_run"] == 2


def test_gpu_slots_and_their_errors():
    assert sweep_mod.gpu_slots(["0", "1", "2"], 2, per_gpu=2) == ["0,1", "0,1"]  # GPU 2 idles
    assert sweep_mod.gpu_slots(["4", "6"], 1, per_gpu=1) == ["4", "6"]
    with pytest.raises(ValueError, match=r"gpus_per_run=2 but 1 GPU\(s\).*set sweep.gpus_per_run=1"):
        sweep_mod.gpu_slots(["0"], 2, per_gpu=1)
    with pytest.raises(ValueError, match=r"--gpus 0 runs in this process"):
        sweep_mod.gpu_slots([], 2, per_gpu=1)


def test_gpus_per_run_must_be_positive(tmp_path, data_root):
    path = tiny_sweep(tmp_path, data_root, GRID_2x2)
    with pytest.raises(ConfigError, match="sweep.gpus_per_run must be an integer >= 1, got 0"):
        sweep_mod.load_sweep(path, ["sweep.gpus_per_run=0"])


def test_ddp_darcy_sweeps_differ_only_in_gpus():
    """The DDP check: the 2-GPU sweep trains exactly the 1-GPU sweep's runs (global batch included)."""
    spec1, one = sweep_mod.load_sweep(REPO / "configs/experiments/ddp_darcy_1gpu.yaml", schema=Stage2Config)
    spec2, two = sweep_mod.load_sweep(REPO / "configs/experiments/ddp_darcy_2gpu.yaml", schema=Stage2Config)
    assert (spec1.gpus_per_run, spec2.gpus_per_run) == (1, 2) and {r.gpus for r in two} == {2}
    assert [r.name for r in one] == [r.name for r in two] == ["full_s0", "full_s1", "full_s2"]
    strip = lambda cfg: {**config_dict(cfg), "run_dir": None}  # noqa: E731
    assert [strip(r.cfg) for r in one] == [strip(r.cfg) for r in two]
    assert one[0].cfg.task.name == "darcy" and one[0].cfg.train.batch_size % 2 == 0


@pytest.mark.parametrize("task, levels", [("darcy", [None]), ("dial", [2, 5])])
def test_stage1_arm_sweeps_differ_from_the_source_arm_only_in_the_embedder(task, levels):
    """The pre-registered stage-1 arm: the same grid points and recipe as the source-initialised
    sweeps, the warm-ups starting from each task's (level's) aligned embedder, the knees from those."""
    prereg = REPO / "configs/experiments/prereg"

    def by_point(name):
        _, runs = sweep_mod.load_sweep(prereg / f"{name}.yaml", schema=Stage2Config)
        return {(getattr(r.cfg.task.options, "level", None), r.cfg.adapter.rank, r.cfg.adapter.method, r.cfg.seed): r.cfg
                for r in runs}

    for kind in ("warmup", "knee"):
        source, aligned = by_point(f"{task}_{kind}"), by_point(f"{task}_aligned_{kind}")
        assert aligned and set(aligned) == {p for p in source if p[0] in levels}
        for point, cfg in aligned.items():
            a, s = config_dict(cfg), config_dict(source[point])
            for d in (a, s):
                d.pop("name"), d.pop("run_dir", None)
                d["model"].pop("warmup_from"), d["model"].pop("embedder_from")
            assert a == s, point
            level = point[0]
            if kind == "warmup":
                assert cfg.model.embedder_from == f"results/runs/prereg_stage1/{task}{level if level else ''}"
            else:
                assert cfg.model.warmup_from == f"results/runs/aligned_warmup_{task}" and not cfg.model.embedder_from
