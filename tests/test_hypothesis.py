"""The hypothesis statistics on hand-computed cases, and scripts/hypothesis.py end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orca.sweep import load_sweep
from rank_estimation.evidence import adalora_budget
from tests.conftest import load_script
from rank_estimation.hypothesis import (
    bootstrap_knee,
    budget_matched,
    combine_verdicts,
    knee_order_verdict,
    knee_rank,
    mean_difference_ci,
    permutation_pvalue,
    spearman_with_ci,
    verdict,
)
from orca.spectra import delta_w_ranks, effective_rank_energy, stable_rank

ROOT = Path(__file__).resolve().parents[1]
RANKS = [1, 2, 4, 8, 16]


# ----------------------------------------------------------------------------- (a) knee
def test_knee_is_smallest_rank_within_tolerance():
    # Seed-means 0.10, 0.08, 0.062, 0.0605, 0.060: best 0.060; 5% relative -> limit 0.063 -> rank 4.
    errors = [[0.11, 0.09], [0.08, 0.08], [0.062, 0.062], [0.061, 0.060], [0.060, 0.060]]
    assert knee_rank(RANKS, errors, tol=0.05) == 4
    assert knee_rank(RANKS, errors, tol=0.0) == 16  # only the best itself
    assert knee_rank(RANKS, errors, tol=0.021, rel=False) == 2  # absolute: limit 0.081
    # Order of the sweep does not matter.
    assert knee_rank(RANKS[::-1], errors[::-1], tol=0.05) == 4


def test_bootstrap_knee_interval_brackets_and_single_seed_is_flagged():
    rng = np.random.default_rng(0)
    means = [0.10, 0.08, 0.062, 0.0605, 0.060]
    errors = [list(m + 0.0005 * rng.standard_normal(5)) for m in means]
    out = bootstrap_knee(RANKS, errors, tol=0.05, n_boot=300, seed=1)
    assert out["lo"] <= out["knee"] <= out["hi"] and out["spread"] and out["n_seeds"] == [5] * 5
    single = bootstrap_knee(RANKS, [[m] for m in means], tol=0.05, n_boot=50)
    assert single["lo"] == single["hi"] == single["knee"] == 4 and not single["spread"]


@pytest.mark.parametrize("ranks, errors, match", [
    ([1, 2], [[0.1]], "2 ranks but errors for 1"),
    ([1, 1], [[0.1], [0.2]], "distinct"),
    ([1, 2], [[0.1], [float("nan")]], "non-finite"),
])
def test_knee_errors(ranks, errors, match):
    with pytest.raises(ValueError, match=match):
        knee_rank(ranks, errors)


# ----------------------------------------------------------------------------- (b) correlation
def test_monotone_relation_gives_rho_one_and_small_p():
    x = [0.1, 0.3, 0.35, 0.9, 1.2, 2.0, 2.1, 5.0]
    y = [1, 2, 4, 8, 16, 32, 64, 128]
    out = spearman_with_ci(x, y, n_boot=500, seed=0)
    assert out["rho"] == pytest.approx(1.0) and out["lo"] == pytest.approx(1.0)
    # Exact: only the identity and the reversal reach |rho| = 1 among 8! orderings.
    assert permutation_pvalue(x, y, n_perm=50000) == pytest.approx(2 / math.factorial(8))
    # Beyond n_perm orderings the null is counted exactly (up to EXACT_MAX_N), not sampled.
    assert permutation_pvalue(x, y, n_perm=2000, seed=0) == pytest.approx(2 / math.factorial(8))
    ties_x, ties_y = [1, 1, 2, 3, 3, 3, 4], [2, 1, 1, 5, 3, 4, 4]
    assert permutation_pvalue(ties_x, ties_y, n_perm=100) == pytest.approx(permutation_pvalue(ties_x, ties_y, n_perm=10_000))
    x13 = list(range(13))  # past EXACT_MAX_N: Monte Carlo with the +1 correction
    assert permutation_pvalue(x13, x13, n_perm=2000, seed=0) == pytest.approx(1 / 2001)
    # Three tasks cannot be significant: exact p = 2/6.
    assert permutation_pvalue([1, 2, 3], [1, 5, 9]) == pytest.approx(1 / 3)


def test_random_relation_p_not_small():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(12), rng.standard_normal(12)
    p = permutation_pvalue(x, y, n_perm=4000, seed=0)
    assert p > 0.2
    ci = spearman_with_ci(x, y, n_boot=500)
    assert ci["lo"] < 0 < ci["hi"]
    assert verdict(ci["lo"], ci["hi"], p).startswith("inconclusive (reason: CI spans 0")


@pytest.mark.parametrize("x, y, match", [
    ([1, 2], [1, 2], "at least 3"),
    ([1, 2, 3], [1, 2], "equal length"),
    ([1, 2, float("nan")], [1, 2, 3], "finite"),
    ([1, 1, 1], [1, 2, 3], "constant"),
])
def test_correlation_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        spearman_with_ci(x, y)
    with pytest.raises(ValueError, match=match):
        permutation_pvalue(x, y)


def test_verdict_rule():
    assert verdict(0.2, 0.9, 0.01) == "held"
    assert verdict(-0.9, -0.1, 0.01) == "failed"
    assert verdict(0.2, 0.9, 0.2) == "inconclusive (reason: p = 0.2 >= 0.05)"
    assert verdict(0.2, 0.9, 0.01, extra_reasons=["n tasks = 2 < 3"]) == "inconclusive (reason: n tasks = 2 < 3)"
    small, large = {"lo": 2, "hi": 4, "spread": True}, {"lo": 8, "hi": 16, "spread": True}
    assert knee_order_verdict(small, large) == "held" and knee_order_verdict(large, small) == "failed"
    assert "overlap" in knee_order_verdict(small, {"lo": 4, "hi": 8, "spread": True})
    assert "1 seed per rank" in knee_order_verdict(small, {**large, "spread": False})
    assert combine_verdicts(["held", "held"]) == "held"
    assert combine_verdicts(["held", "failed"]).startswith("inconclusive (reason: the parts disagree")


# ----------------------------------------------------------------------------- (c) Delta W
def _matrix(singular_values, shape=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    s = np.zeros(shape)
    s[range(len(singular_values)), range(len(singular_values))] = singular_values
    return u @ s @ v.T


def test_effective_and_stable_rank_of_known_spectrum():
    # s^2 = 16, 9, 4, 1 (total 30): cumulative 0.533, 0.833, 0.967, 1 -> 90% needs k = 3.
    w = _matrix([4, 3, 2, 1])
    assert effective_rank_energy(w, 0.9) == 3
    assert effective_rank_energy(w, 0.8) == 2
    assert effective_rank_energy(w, 1.0) == 4
    assert stable_rank(w) == pytest.approx(30 / 16)
    assert stable_rank(np.eye(5)) == pytest.approx(5.0)
    assert effective_rank_energy(np.zeros((3, 3))) == 0 and stable_rank(np.zeros((3, 3))) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(np.ones(3))


def test_delta_w_ranks_compares_state_dicts():
    import torch

    base = {"a.weight": torch.zeros(12, 10), "b.weight": torch.ones(4, 4), "b.bias": torch.ones(4)}
    tuned = {"a.weight": torch.tensor(_matrix([4, 3, 2, 1])), "b.weight": torch.ones(4, 4) + torch.eye(4),
             "b.bias": torch.zeros(4)}
    out = delta_w_ranks(base, tuned)
    assert list(out) == ["a", "b"]
    assert out["a"]["energy_rank"] == 3 and out["a"]["stable_rank"] == pytest.approx(30 / 16)
    assert out["b"]["energy_rank"] == 4 and out["b"]["max_rank"] == 4
    with pytest.raises(ValueError, match="missing"):
        delta_w_ranks(base, tuned, ["c"])


# ----------------------------------------------------------------------------- (d) budgets
def test_budget_matched_groups_within_tolerance():
    runs = [
        {"task": "darcy", "variant": "uniform r=4", "budget": 1000, "error": 0.10},
        {"task": "darcy", "variant": "uniform r=4", "budget": 1000, "error": 0.12},
        {"task": "darcy", "variant": "adaptive", "budget": 1050, "error": 0.08},
        {"task": "darcy", "variant": "adalora", "budget": 1090, "error": 0.09},
        {"task": "darcy", "variant": "uniform r=8", "budget": 2000, "error": 0.07},
        {"task": "cifar", "variant": "adaptive", "budget": 1000, "error": 0.3},
    ]
    buckets = budget_matched(runs, rel_tol=0.1)
    assert [(b["task"], b["budget_lo"], b["budget_hi"]) for b in buckets] == [
        ("cifar", 1000, 1000), ("darcy", 1000, 1090), ("darcy", 2000, 2000)]
    v = buckets[1]["variants"]
    assert sorted(v) == ["adalora", "adaptive", "uniform r=4"]
    assert v["uniform r=4"]["mean"] == pytest.approx(0.11) and v["uniform r=4"]["n"] == 2
    assert v["uniform r=4"]["sd"] == pytest.approx(math.sqrt(2) * 0.01)
    d = mean_difference_ci([0.10, 0.12], [0.08], n_boot=200)
    assert d["diff"] == pytest.approx(0.03) and d["lo"] <= d["diff"] <= d["hi"]
    with pytest.raises(ValueError, match="finite budget"):
        budget_matched([{"task": "t", "variant": "v", "budget": 0, "error": 0.1}])


# ----------------------------------------------------------------------------- the script
#: Synthetic runs have no sweep.json and no body weights: pool them all.
POOL = ["--weights", "any", "--knee-tables", "all", "--budget-tables", "all"]


def _write_run(root: Path, name: str, summary: dict, config: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


def _synthetic_results(root: Path) -> None:
    """Three tasks; knee ranks 2, 4, 16 rise with the mean gap 0.1, 0.4, 1.5; a full run for (c)."""
    knees = {"cifar": (0.1, 2), "ecg": (0.4, 4), "darcy": (1.5, 16)}
    blocks = [f"layers.{i}.blocks.0" for i in range(4)]
    for task, (gap, knee) in knees.items():
        for seed in (0, 1):
            for r in RANKS:
                err = 0.05 + (0.05 if r < knee else 0.0) * (knee / r) + 0.001 * seed
                _write_run(root, f"stage3__{task}__r{r}__s{seed}", {
                    "stage": "stage3", "task": task, "method": "lora", "metric": "err", "seed": seed,
                    "test": {"err": err}, "val": {"err": err}, "params": {"adapters": 1000 * r},
                    "run_dir": "x"}, {"adapter": {"method": "lora", "rank": r, "rank_map": None}})
            _write_run(root, f"stage3__{task}__adaptive__s{seed}", {
                "stage": "stage3", "task": task, "method": "lora", "metric": "err", "seed": seed,
                "test": {"err": 0.049 + 0.001 * seed}, "val": {"err": 0.05}, "params": {"adapters": 4100},
                "run_dir": "x"}, {"adapter": {"method": "lora", "rank": 8, "rank_map": "runs/x/rank_map.json"}})
        d = root / f"stage2__{task}"
        d.mkdir()
        profile = [gap * (0.5 + i / 3) for i in range(4)]
        (d / "rank_map.json").write_text(json.dumps({
            "rank_map": {}, "gap_metric": "mmd",
            "gap_profile": {"layers": blocks, "D": profile}}))
        (d / "summary.json").write_text(json.dumps({"stage": "stage2", "task": task}))


def _script_module():
    """scripts/hypothesis.py as a module, under another name than the property-testing library's."""
    return load_script("hypothesis.py", "hypothesis_script")


def _main(monkeypatch, *argv) -> Path:
    """scripts/hypothesis.py's main in this process, from the checkout as the command runs: the same code
    without a fresh interpreter's imports (test_script_end_to_end_is_deterministic runs the command)."""
    monkeypatch.chdir(ROOT)
    return _script_module().main([str(a) for a in argv])


def _run_script(runs: Path, out: Path):
    """The command as the README writes it, ``bash scripts/hypothesis.sh``, from an environment with no
    PYTHONPATH (the wrapper makes the checkout importable) and this interpreter (ORCA_PYTHON)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", "scripts/hypothesis.sh", "--runs", str(runs), "--out", str(out),
                           "--n-boot", "200", "--n-perm", "2000", *POOL],
                          cwd=ROOT, env={**env, "ORCA_PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=120)


def test_script_end_to_end_is_deterministic(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    _synthetic_results(runs)
    first = _run_script(runs, out)
    assert first.returncode == 0, first.stderr
    report = (out / "hypothesis.md").read_text()
    assert "| darcy | 16 |" in report and "| cifar | 2 |" in report
    assert "rho = 1.000" in report  # knees rise with the mean gap
    # 3 tasks: exact permutation p = 1/3, so the correlation cannot be called "held".
    assert "inconclusive (reason: p = 0.333" in report
    assert "smallest two-sided permutation p is 2/3! = 0.333 >= alpha = 0.05" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "hypothesis_rank_vs_error.png" in pngs and "hypothesis_gap_vs_knee.png" in pngs
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = _run_script(runs, out)
    assert second.returncode == 0, second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_script_without_runs_says_what_is_missing(tmp_path, monkeypatch):
    md = _main(monkeypatch, "--runs", tmp_path / "nothing", "--out", tmp_path / "results", "--n-boot", "200",
               "--n-perm", "2000", *POOL)
    assert md == tmp_path / "results" / "hypothesis.md"
    report = md.read_text()
    assert "No stage-3 runs" in report and "rho =" not in report


def test_script_delta_w_from_a_given_base_state(tmp_path, monkeypatch):
    """(c) on a synthetic full fine-tuning checkpoint whose update rank rises with the block gap."""
    import torch

    runs, out = tmp_path / "runs", tmp_path / "results"
    _synthetic_results(runs)
    d = _write_run(runs, "stage3__darcy__full__s0", {
        "stage": "stage3", "task": "darcy", "method": "full", "metric": "err", "seed": 0,
        "test": {"err": 0.04}, "val": {"err": 0.04}, "params": {"adapters": 0}, "run_dir": "x"},
        {"adapter": {"method": "full"}})
    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(4):  # block i: Delta W of rank i + 1, gaps rise with i (see _synthetic_results)
        key = f"body.layers.{i}.blocks.0.attn.qkv.weight"
        base[key] = torch.randn(24, 8, generator=gen, dtype=torch.float64)
        # Orthonormal factors: i + 1 equal singular values, so energy rank ceil(0.9 k) = k, stable rank k.
        u = torch.linalg.qr(torch.randn(24, i + 1, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(8, i + 1, generator=gen, dtype=torch.float64))[0]
        tuned[key] = base[key] + 0.01 * u @ v.T
    (d / "ckpt").mkdir()
    torch.save({"model": tuned}, d / "ckpt" / "best.pt")
    torch.save(base, tmp_path / "base.pt")
    _main(monkeypatch, "--runs", runs, "--out", out, "--n-boot", "100", "--n-perm", "1000",
          "--base-state", tmp_path / "base.pt", *POOL)
    report = (out / "hypothesis.md").read_text()
    section = report.split("## (c)")[1].split("## (d)")[0]
    # 4 blocks: exact permutation p = 2/24 for a perfect rank order -> inconclusive at alpha 0.05.
    assert "energy rank (0.9): rho = 1.000" in section and "p = 0.0833" in section
    # every block is 8 wide, so the width-controlled fraction k / 8 keeps the same order
    assert "width control, energy rank / min(d_out, d_in): rho = 1.000" in section
    assert "Warning" not in section
    assert (out / "hypothesis_gap_vs_delta_w.png").is_file()


def test_script_delta_w_from_json_equals_checkpoint_of_a_real_full_run(tiny_overrides, tmp_path):
    """(c) on a real tiny full run: from ckpt/best.pt with W_0 rebuilt from the run's config (no
    delta_w.json.gz), then from delta_w.json.gz alone after ckpt/ is deleted: the same numbers."""
    import shutil
    from types import SimpleNamespace

    import torch

    from orca.config import load_config
    from orca.train import run_stage3

    torch.set_num_threads(1)
    runs = tmp_path / "runs"
    run = run_stage3(load_config(None, tiny_overrides + ["train.epochs=1", f"output_dir={runs}", "train.lr=1e-4"]))
    d = runs / "stage2__darcy"
    d.mkdir()
    (d / "rank_map.json").write_text(json.dumps({"rank_map": {}, "gap_metric": "mmd", "gap_profile": {
        "layers": [f"layers.{i}.blocks.0" for i in range(4)], "D": [0.1, 0.2, 0.3, 0.4]}}))
    (d / "summary.json").write_text(json.dumps({"stage": "stage2", "task": "darcy"}))
    script = _script_module()
    args = ["--runs", str(runs), "--n-boot", "50", "--n-perm", "100", *POOL]
    a = SimpleNamespace(energy=0.9, base_state=None, n_boot=50, n_perm=100, seed=0, alpha=0.05)

    def section_and_items(out):
        path = script.main(args + ["--out", str(tmp_path / out)])
        runs_, gaps, _ = script.load_runs(runs, "test")
        items = script.analysis_delta_w(runs_, script.task_gaps(gaps)[0], a)
        return path.read_text().split("## (c)")[1].split("## (d)")[0], items

    spectra = run.path / "delta_w.json.gz"
    assert spectra.is_file()
    spectra.rename(tmp_path / "delta_w.json.gz")
    from_ckpt, ckpt_items = section_and_items("ckpt")
    assert "rebuilt from the run's config.yaml" in from_ckpt and "rho = " in from_ckpt
    assert "Warning" not in from_ckpt  # a wrong W_0 would make ||Delta W|| ~ ||W_0||
    (tmp_path / "delta_w.json.gz").rename(spectra)
    shutil.rmtree(run.path / "ckpt")
    from_json, json_items = section_and_items("json")
    assert "spectra from `delta_w.json.gz`" in from_json and "rebuilt" not in from_json
    [c], [j] = ckpt_items, json_items
    assert (c["source"], j["source"]) == ("ckpt/best.pt", "delta_w.json.gz")
    assert j["blocks"] == c["blocks"] and j["D"] == c["D"] and j["energy"] == c["energy"]
    assert j["stable"] == pytest.approx(c["stable"], rel=1e-6, abs=0)
    assert j["rel_update"] == pytest.approx(c["rel_update"], rel=1e-6, abs=0)
    for key in ("energy_corr", "stable_corr"):
        assert j[key] == c[key]
    # The report: the same lines but for the named source.
    strip = lambda text: [line.split("), ", 1)[-1] for line in text.splitlines()]  # noqa: E731
    assert strip(from_json) == strip(from_ckpt)


def test_default_selection_keeps_one_body_and_the_sweeps_made_for_each_analysis(tmp_path, monkeypatch):
    """By default only the fractal body's runs of the knee tables enter (a); a run of another body, or
    of another table (here: same task and rank, but a different recipe), would bend the curve."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    weights = "file:results/checkpoints/fractal_swin.safetensors"

    def run(name, table, rank, err, seed, body=weights):
        d = _write_run(runs, name, {"stage": "stage3", "task": "darcy", "method": "lora", "metric": "err",
                                    "seed": seed, "test": {"err": err}, "val": {"err": err}, "weights": body,
                                    "params": {"adapters": 1000 * rank}, "run_dir": "x"},
                       {"adapter": {"method": "lora", "rank": rank, "rank_map": None}})
        (d / "sweep.json").write_text(json.dumps({"table": table}))

    for seed in (0, 1):
        for r, err in ((1, 0.20), (4, 0.10), (16, 0.10)):
            run(f"table3/lora_r{r}_s{seed}", "table3", r, err + 0.001 * seed, seed)
        run(f"evidence/lora_r1_s{seed}", "body_evidence_darcy", 1, 0.01, seed)            # another recipe
        run(f"random/lora_r16_s{seed}", "table3", 16, 0.5, seed, body="none (random init)")  # another body
    _main(monkeypatch, "--runs", runs, "--out", out, "--n-boot", "50", "--n-perm", "100")
    report = (out / "hypothesis.md").read_text()
    assert "| darcy | 4 |" in report  # knee from table3 alone: r = 4 is within 5% of the best
    assert "2 run(s) with body weights 'none (random init)' skipped" in report
    assert "(a)-(c): 2 stage-3 run(s) outside tables table3, ranks_patches, ranks_heldout, ranks_digits, ranks_tones not used" in report


def test_adalora_budget_from_summary_else_its_target_share_of_the_allocation(tmp_path):
    d = tmp_path / "adalora_r6_s0"
    d.mkdir()
    notes = []
    recorded = {"params": {"adapters": 900}, "adapter_report": {"final_budget": {"adapter_params": 612}}}
    assert adalora_budget(d, recorded, {"rank": 6}, notes, tmp_path) == 612 and not notes
    # Nothing recorded: 9 allocated units per module (ceil(1.5 * 6)) pruned to 6 -> 2/3 of the allocation.
    assert adalora_budget(d, {"params": {"adapters": 900}}, {"rank": 6}, notes, tmp_path) == 600
    assert "no AdaLoRA final budget recorded" in notes[0] and "at its target rank 6" in notes[0]
    assert adalora_budget(d, {"params": {"adapters": 800}}, {"rank": 6, "adalora_init_rank": 8},
                                 notes, tmp_path) == 600


def test_a_partial_sweep_is_left_out_of_the_knees_and_named(tmp_path):
    """A sweep cut at a deadline runs its low ranks first: its knee would be the best of those. Its runs
    stay out of (a)-(c) until every grid point of its sweep file has finished, and the notes say which
    are missing; a complete sweep (all its grid points present) is read."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    sweep_file = tmp_path / "tiny_sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tiny", "task": {"name": "tones"}, "adapter": {"method": "lora", "rank": 1},
        "sweep": {"table": "tiny", "output_dir": str(runs), "grid": {"adapter.rank": [1, 4], "seed": [0, 1]}}}))

    def run(name, rank, err, seed):
        d = _write_run(runs, f"tiny/{name}", {"stage": "stage3", "task": "tones", "method": "lora", "metric": "err",
                                             "seed": seed, "test": {"err": err}, "val": {"err": err},
                                             "params": {"adapters": 1000 * rank}, "run_dir": "x"},
                       {"adapter": {"method": "lora", "rank": rank, "rank_map": None}})
        (d / "sweep.json").write_text(json.dumps({"table": "tiny", "sweep_file": str(sweep_file)}))

    script = _script_module()
    grid = load_sweep(sweep_file)[1]
    assert len(grid) == 4
    for g in grid[:3]:  # the last grid point has not run
        run(g.name, g.point["adapter.rank"], 0.2 / g.point["adapter.rank"] + 0.001 * g.point["seed"], g.point["seed"])
    args = ["--runs", str(runs), "--out", str(out), "--n-boot", "50", "--n-perm", "100", "--weights", "any",
            "--knee-tables", "tiny"]
    def knee_table(report: str) -> str:  # the pre-registered design's table lists every task, run or not
        return report.split("## (a) Knee rank per task")[1].split("## (b)")[0]

    report = script.main(args).read_text()
    assert "| tones |" not in knee_table(report)
    assert f"tiny: 3 of 4 runs of {sweep_file} finished (missing: {grid[3].name}); left out until the sweep is " \
        "complete" in report
    last = grid[3].point
    run(grid[3].name, last["adapter.rank"], 0.2 / last["adapter.rank"] + 0.001 * last["seed"], last["seed"])
    report = script.main(args).read_text()
    assert "| tones | 4 |" in knee_table(report) and "left out until" not in report


def test_check_passes_on_a_fresh_report_and_fails_on_one_changed_byte(tmp_path, monkeypatch, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results"
    _synthetic_results(runs)
    args = ["--runs", runs, "--out", out, "--n-boot", "200", "--n-perm", "2000", *POOL]
    _main(monkeypatch, *args)
    payload = json.loads((out / "hypothesis.json").read_text())
    assert payload["primary_metric"] == "mmd_source"
    assert all(row["knee_aligned"] is None and row["gap_aligned"] is None for row in payload["stage1"]["rows"])
    assert "stage-1 comparison on darcy: no gap profile with the aligned embedder" in payload["missing"]
    assert "dial0: knee sweep not run" in payload["missing"]
    md = out / "hypothesis.md"
    assert _main(monkeypatch, *args, "--check") == md
    md.write_text(md.read_text().replace("Pre-registered test", "Pre-registered tesT", 1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _main(monkeypatch, *args, "--check")
    assert exc.value.code == 1 and "hypothesis.md differ" in capsys.readouterr().err.replace(str(out) + "/", "")
