"""The calibrated gap metrics and the selection rule, on Gaussian clouds whose order is known."""
import pytest
import torch

from rank_estimation.calibration import CANDIDATES, evaluate, joint_bootstrap, saturation, select_primary
from rank_estimation.gaps import GAP_METRICS, mmd, mmd_saturation, mmd_source, sliced_w2_source

DIM = 32
BLOCKS = ["b0", "b1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small kernel matrices: on a shared machine, extra threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cloud(n, shift, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    x[:, 0] += shift
    return x * scale


def test_source_bandwidth_does_not_saturate_where_the_pooled_median_does():
    s = cloud(128, 0, 1)
    near, far, farther = cloud(64, 16, 2), cloud(64, 32, 2), cloud(64, 64, 2)
    # the pooled median widens with the gap: both far clouds sit at the ceiling and tie
    assert mmd_saturation(s, far, bandwidth="pooled") > 0.95
    assert mmd(s, farther) - mmd(s, far) < 0.1
    # the source's own bandwidth keeps growing and stays below the ceiling
    values = [mmd_source(s, t) for t in (near, far, farther)]
    assert values[0] < values[1] < values[2] and values[2] - values[1] > 0.15
    assert mmd_saturation(s, far) < 0.7
    assert abs(mmd_source(s, cloud(64, 0, 3))) < 0.005  # unbiased: ~0 for one distribution


def test_sliced_w2_source_is_in_source_spreads():
    s, t = cloud(512, 0, 1), cloud(512, 3.0, 2)
    assert sliced_w2_source(s, t) == pytest.approx(sliced_w2_source(s * 10, t * 10), rel=1e-4)
    # a shift of 3 source sds along axis 0 shows in a direction theta as 3 |theta_0| / sd(theta): W2 ~ 3 / sqrt(DIM)
    assert sliced_w2_source(s, t, n_projections=4096) == pytest.approx(3 / DIM ** 0.5, rel=0.25)
    assert sliced_w2_source(s, cloud(512, 0, 3)) < 0.15
    with pytest.raises(ValueError, match="n_projections=0"):
        sliced_w2_source(s, t, n_projections=0)


def test_candidates_are_registered():
    assert all(m in GAP_METRICS for m in CANDIDATES)


def _sets(task_shifts):
    dial = {f"dial{i}": {b: cloud(64, 0.6 * i, 10 + j) for j, b in enumerate(BLOCKS)} for i in range(4)}
    tasks = {name: {b: cloud(64, sh, 20 + k * 7 + j) for j, b in enumerate(BLOCKS)}
             for k, (name, sh) in enumerate(task_shifts.items())}
    return dial, tasks


def test_rule_picks_a_metric_that_rises_and_resolves_and_rejects_the_saturated_one():
    source = {b: cloud(128, 0, j) for j, b in enumerate(BLOCKS)}
    dial, tasks = _sets({"darcy": 40.0, "tones": 60.0, "digits": 20.0})
    sets = {**dial, **tasks}
    groups = {**{k: "dial" for k in dial}, **{k: k for k in tasks}}
    evals = {}
    for m in CANDIDATES:
        res = joint_bootstrap(m, source, sets, BLOCKS, groups, n_boot=40, seed=0)
        for s in res["sets"].values():
            assert s["lo"] <= s["value"] <= s["hi"]
        sats = {t: saturation(m, source, sets[t], BLOCKS) for t in tasks}
        evals[m] = evaluate(res, list(dial), list(tasks), sats)
    assert evals["mmd_source"]["passes"] and evals["mmd_source"]["task_order"] == ["digits", "darcy", "tones"]
    assert evals["sliced_w2_source"]["passes"]
    assert not evals["mmd"]["passes"] and "saturated" in " ".join(evals["mmd"]["reasons"])
    assert select_primary(evals) == {"primary": "mmd_source", "clause": "passes the dial and the task criteria"}


def test_rule_fails_a_flat_dial_with_the_unseparated_steps_named():
    source = {b: cloud(128, 0, j) for j, b in enumerate(BLOCKS)}
    flat = {f"dial{i}": {b: cloud(64, 1.0, 10 + j) for j, b in enumerate(BLOCKS)} for i in range(3)}
    flat["dial1"] = {b: cloud(64, 3.0, 10 + j) for j, b in enumerate(BLOCKS)}  # rises, then falls back
    res = joint_bootstrap("mmd_source", source, flat, BLOCKS, {k: "dial" for k in flat}, n_boot=40)
    ev = evaluate(res, list(flat), [], {})
    assert not ev["rises"] and ev["reasons"] == ["dial levels not separated: dial1->dial2"]


def test_selection_fallbacks():
    ev = {m: {"passes": False, "rises": False} for m in CANDIDATES}
    assert select_primary(ev)["clause"].startswith("no candidate passes the dial criterion")
    ev["mmd"]["rises"] = True
    assert select_primary(ev) == {"primary": "mmd", "clause": "passes the dial criterion only; the task order is unresolved"}
    with pytest.raises(ValueError, match="no evaluation for candidates"):
        select_primary({"mmd": ev["mmd"]})


def test_a_group_must_hold_equal_sized_sets():
    source = {"b0": cloud(16, 0, 0)}
    with pytest.raises(ValueError, match="a group's sets must hold the same images"):
        joint_bootstrap("mmd", source, {"a": {"b0": cloud(8, 0, 1)}, "b": {"b0": cloud(9, 0, 2)}}, ["b0"],
                        {"a": "g", "b": "g"})
