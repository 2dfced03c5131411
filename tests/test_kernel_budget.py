"""orca/kernel_budget.py and scripts/kernel_budget.py: the ceiling arithmetic on numbers worked by hand,
the errors a user sees for files that cannot be read together, and the committed budget reproducing
from the committed profile it names."""
from __future__ import annotations

import json
import pytest

from orca.kernel_budget import BudgetInputError, budget_markdown, kernel_budget

from tests.conftest import REPO, load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(rows, timing="device"):
    return {"results": [{"config": c, "batch": b, "summary": {"timing": timing, "device_ms": d, "gemm_ms": g}}
                        for c, b, d, g in rows]}


def _bench(rows):
    return {"results": [{"config": c, "batch": b, "gflop_per_img": f, "img_per_s": s} for c, b, f, s in rows]}


PROFILE = _profile([("full", 256, 100.0, 36.0), ("lora", 256, 94.0, 42.0)])
BENCH = _bench([("full", 256, 90.0, 1000.0), ("lora", 256, 60.0, 1050.0)])


def test_budget_arithmetic_by_hand():
    (row,) = kernel_budget(PROFILE, BENCH, targets=(1.3, 1.2))
    # FLOPs 60/90 -> ideal GEMM 36 * 2/3 = 24 ms; non-GEMM 94 - 42 = 52 ms; excess 42 - 24 = 18 ms
    assert row["flop_ratio"] == pytest.approx(2 / 3)
    assert row["ideal_gemm_ms"] == pytest.approx(24.0)
    assert row["non_gemm_ms"] == pytest.approx(52.0) and row["base_non_gemm_ms"] == pytest.approx(64.0)
    assert row["gemm_excess_ms"] == pytest.approx(18.0)
    assert row["ceiling"] == pytest.approx(100.0 / 76.0)  # 1.316
    assert row["device_ratio"] == pytest.approx(100.0 / 94.0)
    assert row["img_per_s_ratio"] == pytest.approx(1.05)
    # 1.3x: 100 / 1.3 - 76 = 0.923 ms of excess allowed; 1.2x: 100 / 1.2 - 76 = 7.33 ms
    assert row["allowed_excess_ms"]["1.3"] == pytest.approx(100 / 1.3 - 76)
    assert row["allowed_excess_ms"]["1.2"] == pytest.approx(100 / 1.2 - 76)
    md = budget_markdown([row])
    assert "**1.32x**" in md and "| 0.92 | 7.33 |" in md and "1.06x (1.05x)" in md


def test_budget_above_the_ceiling_is_negative_and_each_batch_has_its_own_base():
    profile = _profile([("full", 64, 30.0, 10.0), ("full", 256, 100.0, 36.0), ("lora", 64, 28.0, 12.0),
                        ("lora", 256, 94.0, 42.0)])
    bench = _bench([("full", 64, 90.0, 900.0), ("full", 256, 90.0, 1000.0), ("lora", 64, 60.0, 950.0),
                    ("lora", 256, 60.0, 1050.0)])
    rows = kernel_budget(profile, bench, targets=(1.5,))
    assert [(r["config"], r["batch"]) for r in rows] == [("lora", 64), ("lora", 256)]
    small = rows[0]  # ideal 10 * 2/3, non-GEMM 16: ceiling 30 / 22.67 = 1.32 < 1.5
    assert small["ceiling"] == pytest.approx(30 / (16 + 20 / 3))
    assert small["allowed_excess_ms"]["1.5"] == pytest.approx(20 - 16 - 20 / 3) and small["allowed_excess_ms"]["1.5"] < 0


@pytest.mark.parametrize("profile, bench, message", [
    (_profile([("full", 256, 100.0, 36.0), ("lora", 256, 94.0, 42.0)], timing="cpu_self"), BENCH, "'cpu_self' timing"),
    (_profile([("lora", 256, 94.0, 42.0)]), BENCH, "no 'full' profile at batch 256"),
    (PROFILE, _bench([("full", 256, 90.0, 1000.0)]), "no FLOP count for lora at batch 256"),
    ({"results": []}, BENCH, "the profile has no results"),
    ({"results": [{"batch": 256}]}, BENCH, "has no 'config'"),
])
def test_budget_input_errors(profile, bench, message):
    with pytest.raises(BudgetInputError, match=message):
        kernel_budget(profile, bench)


def test_script_refuses_a_cpu_profile_from_bench_train_and_writes_nothing(tmp_path, capsys):
    """The real file formats: a --smoke --profile run of bench_train.py is CPU-timed, which the
    budget must refuse with a message rather than price CPU time as if it were kernels."""
    bench = load_script("bench_train.py", "bench_train_budget")
    bench.main(["--smoke", "--methods", "full", "lora", "--profile", "1", "--out", str(tmp_path)])
    budget = load_script("kernel_budget.py")
    out = tmp_path / "budget"
    assert budget.main([str(tmp_path / "train_smoke_profile.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernel_budget: lora at batch 4 was profiled with 'cpu_self' timing")
    assert not list(tmp_path.glob("budget*"))


def test_script_errors_for_missing_and_unpaired_files(tmp_path, capsys):
    budget = load_script("kernel_budget.py")
    assert budget.main([str(tmp_path / "nothing_profile.json"), "--out", str(tmp_path / "b")]) == 2
    assert "no profile file" in capsys.readouterr().err
    odd = tmp_path / "odd.json"
    odd.write_text("{}")
    assert budget.main([str(odd), "--out", str(tmp_path / "b")]) == 2
    assert "does not end in _profile.json: pass --bench" in capsys.readouterr().err
    broken = tmp_path / "x_profile.json"
    broken.write_text("{not json")
    assert budget.main([str(broken), "--out", str(tmp_path / "b")]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_committed_budget_reproduces_from_its_profile(tmp_path, monkeypatch):
    committed = json.loads((REPO / "results/bench/kernel_budget.json").read_text())
    args = committed["command"].split()[2:]  # drop "python scripts/kernel_budget.py"
    i = args.index("--out") if "--out" in args else len(args)
    args = args[:i] + args[i + 2:] + ["--out", str(tmp_path / "again")]
    monkeypatch.chdir(REPO)  # the committed command names repo-relative paths
    assert load_script("kernel_budget.py").main(args) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["rows"] == committed["rows"]
    lora = next(r for r in committed["rows"] if r["config"] == "lora" and r["batch"] == 256)
    assert lora["ceiling"] < 1.31  # 1.3x over full fine-tuning needs zero GEMM excess
