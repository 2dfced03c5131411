"""The pre-registered plateau rule and the pilot judge that applies it."""
import json

import pytest

from orca.errors import UsageError
from rank_estimation.plateau import plateau, run_curve
from scripts.plateau_pilot import main


def test_tail_is_the_last_fifth_rounded_up():
    assert plateau([1.0] * 40).head_epochs == 32
    assert plateau([1.0] * 20).head_epochs == 16
    assert plateau([1.0] * 7).head_epochs == 5      # ceil(1.4) = 2 tail epochs


def test_improvement_is_relative_to_the_best_before_the_tail():
    # best of epochs 1-8 is 0.50 (epoch 6); the tail reaches 0.495: 1% better -> passes
    curve = [0.9, 0.7, 0.6, 0.55, 0.52, 0.50, 0.51, 0.505, 0.497, 0.495]
    r = plateau(curve)
    assert (r.head_epochs, r.best_head, r.best) == (8, 0.50, 0.495)
    assert r.improvement == pytest.approx(0.01)
    assert r.passed
    # the same head, a tail that reaches 0.485: 3% better -> fails
    r = plateau(curve[:8] + [0.49, 0.485])
    assert r.improvement == pytest.approx(0.03)
    assert not r.passed


def test_a_noisy_last_epoch_does_not_fail_a_flat_curve():
    r = plateau([0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.9])
    assert r.improvement == 0.0 and r.passed


def test_exactly_the_tolerance_fails():
    r = plateau([1.0] * 8 + [0.96875, 1.0], tolerance=0.03125)   # binary fractions: exact
    assert r.improvement == 0.03125
    assert not r.passed


@pytest.mark.parametrize("curve, message", [([0.1] * 4, "at least 5 epochs"),
                                             ([0.1] * 5 + [float("nan")], "non-finite"),
                                             ([0.1] * 5 + [-0.1], "negative")])
def test_bad_curves_are_refused(curve, message):
    with pytest.raises(UsageError, match=message):
        plateau(curve)


def _run(tmp_path, curve, status="finished", epochs=None, metric="rel_l2"):
    run = tmp_path / "lora_r8_s0"
    run.mkdir()
    summary = {"stage": "stage3", "metric": metric, "epochs": epochs or len(curve), "status": status}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = []
    for e, v in enumerate(curve, 1):
        lines.append({"kind": "train", "epoch": e, "step": 10 * e, "train/loss": 1.0})
        lines.append({"kind": "epoch", "epoch": e, "step": 10 * e, f"val/{metric}": v, "val/loss": v})
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return run


def test_run_curve_reads_the_primary_metric_per_epoch(tmp_path):
    run = _run(tmp_path, [0.3, 0.2, 0.1, 0.1, 0.1], metric="error")
    assert run_curve(run) == ("error", [0.3, 0.2, 0.1, 0.1, 0.1])


def test_pilot_exit_status_and_record(tmp_path, capsys):
    flat = _run(tmp_path, [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    out = tmp_path / "pilot.json"
    assert main([str(flat), "--out", str(out)]) == 0
    assert "[plateau_pilot] plateau:" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["passed"] is True and record["head_epochs"] == 8 and len(record["curve"]) == 10


def test_pilot_still_learning_exits_1(tmp_path, capsys):
    rising = _run(tmp_path, [1.0 - 0.05 * e for e in range(10)])
    assert main([str(rising)]) == 1
    assert "NO plateau" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [({"status": "running"}, "has not finished"),
                                              ({"epochs": 12}, "validation for 10 of 12 epochs")])
def test_pilot_refuses_an_unfinished_or_partly_validated_run(tmp_path, kwargs, message):
    run = _run(tmp_path, [0.1] * 10, **kwargs)
    with pytest.raises(UsageError, match=message):
        run_curve(run)


def test_pilot_cli_one_line_error(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "scripts/plateau_pilot.py", str(tmp_path / "nothing")],
                       capture_output=True, text=True, env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: no finished run at")


def test_verdicts_reach_the_preregistered_report(tmp_path):
    from rank_estimation.plateau import load_verdicts
    from rank_estimation.preregistered import analyse, render
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    flat = _run(tmp_path / "a", [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    rising = _run(tmp_path / "b", [1.0 - 0.05 * e for e in range(10)])
    pilots = tmp_path / "pilots"
    (pilots / "superseded").mkdir(parents=True)
    assert main([str(flat), "--out", str(pilots / "knee_x.json")]) == 0
    assert main([str(rising), "--out", str(pilots / "knee_y.json")]) == 1
    assert main([str(rising), "--out", str(pilots / "superseded" / "knee_y.json")]) == 1
    verdicts = load_verdicts(pilots)
    assert [(v["key"], v["passed"]) for v in verdicts] == [("knee_x", True), ("knee_y", False)]
    # rising: best of the first 8 epochs 0.65, of all 10 0.55 -> the tail improved it 15.38%
    assert verdicts[1]["improvement"] == pytest.approx(0.1 / 0.65)
    text = render(analyse([], {}, "mmd_source", n_boot=10, n_perm=10, pilots=verdicts))
    assert "| knee_x | val/rel_l2 | 10 | 8 | 0.1 | 0.1 | 0.00% | plateau (< 2%) |" in text
    assert "| knee_y | val/rel_l2 | 10 | 8 | 0.65 | 0.55 | 15.38% | no plateau (< 2%) |" in text
    assert load_verdicts(tmp_path / "no_such_dir") == []


def test_a_verdict_without_its_fields_is_one_error(tmp_path):
    from orca.errors import FileReadError
    from rank_estimation.plateau import load_verdicts
    (tmp_path / "knee_x.json").write_text(json.dumps({"passed": True}))
    with pytest.raises(FileReadError, match="the pilot verdict lacks metric, epochs"):
        load_verdicts(tmp_path)
