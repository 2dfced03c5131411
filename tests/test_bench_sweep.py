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
    assert report["max_abs_metric_diff_compiled_vs_eager_packed"] < 1e-4
    config = (tmp_path / "work" / "packed_compiled" / "knee" / "head_s0" / "config.yaml").read_text()
    assert "compile: true" in config
    (eager,) = [v for k, v in report["profile"].items() if k.startswith("packed,")]
    (compiled,) = [v for k, v in report["profile"].items() if k.startswith("packed_compiled")]
    assert compiled["first_step_s"] > eager["first_step_s"]  # the compilation is in the first step
    md = (out / "sweep_engine.md").read_text()
    assert "packed_compiled ran train.compile_mode=default" in md
