"""The pre-registered analysis on synthetic sweeps whose knees, correlation and gamma are known."""
import json

import numpy as np
import pytest

from rank_estimation.preregistered import (DIAL_KEYS, KNEE_RANKS, PLACEBO_ARMS, TASK_KEYS, analyse, knee_replicates,
                                           render)


def curve(knee, rng, noise=0.002):
    """Error falls 20% per rank step until the knee, then stays flat (plus seed noise)."""
    out = []
    for r in KNEE_RANKS:
        steps = sum(1 for k in KNEE_RANKS if k <= min(r, knee)) - 1
        out.append((r, [0.3 * 0.8 ** (steps - (len([k for k in KNEE_RANKS if k <= knee]) - 1)) + noise * rng.standard_normal()
                        for _ in range(3)]))
    return out


def sweep(knees, rng):
    runs = []
    for key, knee in knees.items():
        for r, errs in curve(knee, rng):
            runs += [{"key": key, "table": "knee_x", "rank": r, "seed": s, "error": e} for s, e in enumerate(errs)]
    return runs


def test_a_planted_law_is_recovered_and_everything_is_reported():
    rng = np.random.default_rng(0)
    knees = dict(zip(TASK_KEYS, [0, 1, 2, 4, 8, 16, 32, 64, 16, 4, 2, 1]))
    gaps = {k: {"value": 0.02 * (1 + v) ** 0.5, "lo": 0.018 * (1 + v) ** 0.5, "hi": 0.022 * (1 + v) ** 0.5}
            for k, v in knees.items()}
    res = analyse(sweep(knees, rng), gaps, "mmd_source", n_boot=200, n_perm=2000, n_draws=50)
    for t in res["tasks"]:
        assert t["complete"] and t["knees"]["0.05"]["knee"] == knees[t["key"]], t["key"]
        assert t["knees"]["0.05"]["lo"] <= knees[t["key"]] <= t["knees"]["0.05"]["hi"]
    assert res["spearman"]["rho"] == pytest.approx(1.0) and res["spearman"]["p"] < 1e-6
    assert res["gamma"]["lo"] < 0.5 < res["gamma"]["hi"] and res["gamma"]["p_positive"] > 0.999
    # only the placebos and the stage-1 arm, not run here, are missing
    assert res["missing"] and all(m.startswith(("stage-1 comparison on", "placebo comparison on")) for m in res["missing"])
    assert not any("knee sweep" in m for m in res["missing"] if "aligned" not in m)
    json.dumps(res)  # JSON-ready
    md = render(res)
    assert "P(gamma > 0) = 1.000" in md and "rho = 1.000" in md


def test_a_flat_curve_has_knee_zero_and_missing_data_is_listed_not_estimated():
    rng = np.random.default_rng(1)
    runs = [{"key": "dial0", "table": "knee_dial", "rank": r, "seed": s, "error": 0.1 + 1e-4 * rng.standard_normal()}
            for r in KNEE_RANKS for s in range(3)]
    runs.append({"key": "darcy", "table": "knee_darcy", "rank": 0, "seed": 0, "error": 0.2})
    res = analyse(runs, {"dial0": {"value": 0.0, "lo": -0.01, "hi": 0.01}}, "mmd_source", n_boot=100)
    dial0 = res["tasks"][0]
    assert dial0["knees"]["0.01"]["knee"] == 0 and dial0["complete"]
    darcy = next(t for t in res["tasks"] if t["key"] == "darcy")
    assert darcy["knees"] is None and not darcy["complete"]
    assert res["spearman"] is None and res["gamma"] is None
    assert "darcy: knee sweep incomplete (rank 0: 1 of 3 seeds; rank 1: 0 of 3 seeds" in " ".join(res["missing"])
    assert "not estimated" in render(res)


def test_gap_intervals_containing_zero_stay_out_of_the_gamma_fit():
    rng = np.random.default_rng(2)
    knees = dict(zip(DIAL_KEYS, [0, 1, 2, 4, 8, 16, 32]))
    gaps = {k: {"value": 0.05 * (1 + v) ** 0.7, "lo": 0.04 * (1 + v) ** 0.7, "hi": 0.06 * (1 + v) ** 0.7}
            for k, v in knees.items()}
    gaps["dial0"] = {"value": 0.001, "lo": -0.002, "hi": 0.004}
    res = analyse(sweep(knees, rng), gaps, "mmd_source", n_boot=100, n_draws=30)
    assert res["gamma"]["left_out_gap_ci_contains_0"] == ["dial0"] and "dial0" not in res["gamma"]["tasks"]
    assert "dial0" in res["analysed_tasks"]


def test_knee_replicates_cover_the_seed_noise():
    reps = knee_replicates([0, 1, 2], [[0.30, 0.30, 0.30], [0.2, 0.2, 0.4], [0.2, 0.2, 0.2]], 0.05, 300, 0)
    assert set(reps) <= {1, 2} and 0.1 < np.mean(reps == 1) < 0.9


def test_placebo_table_and_differences():
    runs = [{"key": "darcy", "table": "placebo_darcy", "arm": arm, "budget": b, "seed": s,
             "error": {"stage2": 0.04, "uniform": 0.05, "shuffled": 0.045, "depth": 0.05}[arm] + 0.001 * s}
            for arm in PLACEBO_ARMS for b in (99584, 398336, 1593344) for s in range(3)]
    res = analyse(runs, {}, "mmd_source", n_boot=100)
    assert len(res["placebo"]["rows"]) == 12 and len(res["placebo"]["differences"]) == 9
    d = res["placebo"]["differences"][0]
    assert d["placebo"] == "uniform" and d["placebo_minus_stage2"] == pytest.approx(0.01) and d["lo"] > 0
    assert not any(m.startswith("placebo comparison on darcy") for m in res["missing"])
    assert any(m.startswith("placebo comparison on dial3: 0 of 3") for m in res["missing"])


def test_stage1_arm_knees_side_by_side_and_their_difference():
    rng = np.random.default_rng(3)
    runs = sweep({"darcy": 8, "dial2": 4}, rng)
    for r, errs in curve(2, rng):   # the aligned embedder needs rank 2 on darcy
        runs += [{"key": "darcy", "table": "aligned_knee_darcy", "rank": r, "seed": s, "error": e}
                 for s, e in enumerate(errs)]
    gaps = {"darcy": {"value": 0.9, "lo": 0.85, "hi": 0.95}}
    aligned = {"darcy": {"value": 0.4, "lo": 0.35, "hi": 0.45}}
    res = analyse(runs, gaps, "mmd_source", n_boot=200, gaps_aligned=aligned)
    rows = {r["key"]: r for r in res["stage1"]["rows"]}
    darcy = rows["darcy"]
    assert (darcy["knee_source"]["knee"], darcy["knee_aligned"]["knee"]) == (8, 2)
    d = darcy["knee_aligned_minus_source"]
    assert d["diff"] == -6 and d["lo"] <= -6 <= d["hi"] and d["hi"] < 0
    assert darcy["gap_aligned"]["value"] == 0.4 and darcy["gap_source"]["value"] == 0.9
    # aligned runs stay out of the source curve: darcy's primary knee is the source arm's
    assert next(t for t in res["tasks"] if t["key"] == "darcy")["knees"]["0.05"]["knee"] == 8
    assert rows["dial2"]["knee_aligned"] is None and rows["dial2"]["knee_aligned_minus_source"] is None
    assert "stage-1 comparison on dial2: the aligned knee sweep is incomplete" in res["missing"]
    assert "stage-1 comparison on dial5: no gap profile with the aligned embedder" in res["missing"]
    md = render(res)
    assert "| darcy | 0.9 [0.85, 0.95] | 0.4 [0.35, 0.45] | 8 [" in md and "| -6 [" in md


def test_dial_gaps_are_checked_level_by_level():
    """The dial's primary gap, level after measured level: a strict rise with intervals apart
    everywhere, and each step that falls short named (here 2 -> 4 overlaps, 4 -> 5 falls);
    fewer than two measured levels give no verdict."""
    def gap(v, half=0.01):
        return {"value": v, "lo": v - half, "hi": v + half}

    gaps = {"dial0": gap(0.0), "dial1": gap(0.05), "dial2": gap(0.1), "dial4": gap(0.115), "dial5": gap(0.11),
            "darcy": gap(1.0)}
    dial = analyse([], gaps, "mmd_source", n_boot=10)["dial"]
    assert dial["levels"] == [0, 1, 2, 4, 5]
    assert [(s["from"], s["to"], s["rises"], s["apart"]) for s in dial["steps"]] == [
        (0, 1, True, True), (1, 2, True, True), (2, 4, True, False), (4, 5, False, False)]
    assert dial["strictly_increasing"] is False and dial["adjacent_apart"] is False
    md = render(analyse([], gaps, "mmd_source", n_boot=10))
    assert ("Gap dial (5 of 7 levels measured: 0, 1, 2, 4, 5): the primary gap rises strictly from level to "
            "level: no; adjacent levels' intervals apart: no; 2 -> 4: rises, intervals overlap; "
            "4 -> 5: does not rise, intervals overlap.") in md
    rising = {f"dial{level}": gap(0.05 * level, 0.001) for level in range(7)}
    assert analyse([], rising, "mmd_source", n_boot=10)["dial"]["strictly_increasing"] is True
    assert analyse([], rising, "mmd_source", n_boot=10)["dial"]["adjacent_apart"] is True
    alone = analyse([], {"dial3": gap(0.1)}, "mmd_source", n_boot=10)
    assert alone["dial"] == {"levels": [3], "steps": [], "strictly_increasing": None, "adjacent_apart": None}
    assert "Gap dial" not in render(alone)
