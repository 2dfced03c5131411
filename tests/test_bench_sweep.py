"""scripts/bench_sweep.py's smoke mode: the whole measurement (data, packed, one at a time, report)
at toy size on the CPU, so the GPU call runs code that has run."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def test_bench_sweep_smoke_writes_the_report(tmp_path):
    bench = load_script("bench_sweep.py")
    assert bench.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "out" / "sweep_engine.json").read_text())
    assert report["workload"]["runs"] == 4 and report["workload"]["steps_per_run"] == [1]
    assert report["modes"]["packed"]["runs_finished"] == 4 and report["modes"]["alone"]["runs_finished"] == 1
    assert report["best_separate"] == "alone" and report["best_packed"] == "packed"
    rate = report["runs_per_gpu_hour"]
    assert report["speedup_vs_best_separate"] == round(rate["packed"] / rate["alone"], 2)
    assert report["speedup_vs_best_separate_by_mode"] == {"packed": report["speedup_vs_best_separate"]}
    assert rate["packed"] == pytest.approx(4 / report["modes"]["packed"]["wall_s"] * 3600, rel=1e-3)
    # the packed runs are the runs alone: the one run of both modes agrees to rounding
    assert report["max_abs_metric_diff_vs_alone"]["packed"] < 1e-5
    (pack,) = [v for k, v in report["profile"].items() if k.startswith("packed")]
    assert pack["steps"] == 1 and 0 < pack["first_step_s"] <= pack["train_s"] and pack["ms_per_later_step"] is None
    md = (tmp_path / "out" / "sweep_engine.md").read_text()
    assert "speedup_vs_best_separate" in md and report["command"] in md


@pytest.mark.slow
def test_bench_sweep_smoke_times_the_compiled_pack(tmp_path):
    """packed_compiled beside packed: train.compile=true reaches the pack, and its runs are the
    eager pack's runs to rounding (minutes: inductor compiles C++ kernels on the CPU)."""
    bench = load_script("bench_sweep.py")
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--modes", "packed", "packed_compiled", "alone"]) == 0
    report = json.loads((out / "sweep_engine.json").read_text())
    assert report["modes"]["packed_compiled"]["runs_finished"] == 4 and report["compile_mode"] == "default"
    assert set(report["speedup_vs_best_separate_by_mode"]) == {"packed", "packed_compiled"}
    assert report["max_abs_metric_diff_vs_eager_packed"]["packed_compiled"] < 1e-4
    config = (tmp_path / "work" / "packed_compiled" / "knee" / "head_s0" / "config.yaml").read_text()
    assert "compile: true" in config
    (eager,) = [v for k, v in report["profile"].items() if k.startswith("packed,")]
    (compiled,) = [v for k, v in report["profile"].items() if k.startswith("packed_compiled")]
    assert compiled["first_step_s"] > eager["first_step_s"]  # the compilation is in the first step
    md = (out / "sweep_engine.md").read_text()
    assert "packed_compiled ran train.compile_mode=default" in md


def test_bench_sweep_smoke_times_the_graphed_pack(tmp_path):
    """packed_graphs beside packed: train.compile_backend=cudagraphs reaches the pack's runs, and
    they are the eager pack's runs (on a CPU the backend records no graph and runs the traced
    step's eager kernels, so they agree to rounding)."""
    bench = load_script("bench_sweep.py")
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--modes", "packed", "packed_graphs", "alone"]) == 0
    report = json.loads((out / "sweep_engine.json").read_text())
    assert report["modes"]["packed_graphs"]["runs_finished"] == 4
    assert set(report["speedup_vs_best_separate_by_mode"]) == {"packed", "packed_graphs"}
    assert report["max_abs_metric_diff_vs_eager_packed"]["packed_graphs"] < 1e-5
    config = (tmp_path / "work" / "packed_graphs" / "knee" / "head_s0" / "config.yaml").read_text()
    assert "compile: true" in config and "compile_backend: cudagraphs" in config
    assert "packed_graphs vs eager packed" in (out / "sweep_engine.md").read_text()


def test_bench_sweep_reports_a_mode_stopped_by_its_cap_and_keeps_the_others(tmp_path):
    """A mode past its cap is stopped and reported unfinished; the mode before it keeps its
    numbers in the report, and no speedup is computed from the unfinished one."""
    bench = load_script("bench_sweep.py")
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--modes", "alone", "packed", "--mode-cap-s", "packed=1.5"]) == 0
    report = json.loads((out / "sweep_engine.json").read_text())
    packed, alone = report["modes"]["packed"], report["modes"]["alone"]
    assert alone["status"] == "finished" and alone["runs_finished"] == 1 and alone["runs_total"] == 1
    assert packed["status"] == "unfinished" and packed["timed_out"] and packed["runs_total"] == 4
    assert packed["runs_finished"] == 0 and 1.5 <= packed["wall_s"] < 15  # stopped at its cap, not at the budget
    assert report["unfinished"]["packed"]["runs_total"] == 4
    assert set(report["runs_per_gpu_hour"]) == {"alone"} and report["best_separate"] == "alone"
    assert report["speedup_vs_best_separate"] is None and report["speedup_vs_best_separate_by_mode"] == {}
    md = (out / "sweep_engine.md").read_text()
    assert "| packed | 0/4 |" in md and "packed is unfinished (stopped at its time cap)" in md


def test_bench_sweep_counts_only_finished_run_summaries(tmp_path):
    """A run cut short leaves a summary without results (running or failed): not a finished run."""
    bench = load_script("bench_sweep.py")
    knee = tmp_path / "knee"
    done = {"status": "finished", "metric": "rel_l2", "val": {"rel_l2": 0.25}, "test": {"rel_l2": 0.5, "loss": 1.0},
            "wall_time_s": 3.0, "train_img_per_s": 10.0, "steps": 7}
    for name, summary in {"lora_r2_s0": done, "lora_r2_s1": {"status": "running", "stage": "stage3"},
                          "lora_r4_s0": {"status": "failed", "reason": "FloatingPointError: nan"},
                          "lora_r4_s1": {"metric": "rel_l2", "val": {"rel_l2": 0.3}}}.items():
        (knee / name).mkdir(parents=True)
        (knee / name / "summary.json").write_text(json.dumps(summary))
    (knee / "cut").mkdir()
    (knee / "cut" / "summary.json").write_text('{"status": "fin')
    assert bench.finished_runs(tmp_path) == {
        "lora_r2_s0": {"val": 0.25, "test": 0.5, "wall_time_s": 3.0, "train_img_per_s": 10.0, "steps": 7}}


@pytest.mark.parametrize("item", ["packed", "packed=0", "packed=-3", "packed=soon", "warp=10"])
def test_bench_sweep_refuses_a_bad_mode_cap_before_anything_runs(tmp_path, item, capsys):
    bench = load_script("bench_sweep.py")
    work = tmp_path / "work"
    assert bench.exit_on_error(bench.main, ["--smoke", "--out", str(tmp_path / "out"), "--work", str(work),
                                            "--mode-cap-s", item]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --mode-cap-s {item}: not MODE=SECONDS")
    assert not work.exists() and not (tmp_path / "out").exists()
    assert bench.mode_caps(["packed_compiled=240", "per_gpu=90.5", "per_gpu_16=60"]) == {
        "packed_compiled": 240.0, "per_gpu": 90.5, "per_gpu_16": 60.0}
