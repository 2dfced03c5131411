"""OTDD against microsoft/otdd's algorithm (as ORCA calls it) and against tightly converged solutions.

Warnings are errors here: a normal call must not warn, at any feature scale stage 1 meets.
"""
from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from orca.align.otdd import OTDD, otdd
from orca.align.sinkhorn import SinkhornOptions
from tests.otdd_reference import _entropic_ot, _entropic_ot_self, converged_otdd, microsoft_otdd

pytestmark = pytest.mark.filterwarnings("error")


def class_blobs(sizes, dim=32, spread=10.0, offset=0.0, seed=0, dtype=torch.float32):
    """One Gaussian blob per class: means of RMS norm ``spread``, within-class RMS radius ``spread / 2``."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(len(sizes), dim, generator=gen, dtype=torch.float64) * spread / dim ** 0.5
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = means[y] + torch.randn(len(y), dim, generator=gen, dtype=torch.float64) * 0.5 * spread / dim ** 0.5
    return (x + offset).to(dtype), y


#: float64 to rtol 1e-6: a hundred times closer than the converged default, ten thousand times the fixed bound
TIGHT = SinkhornOptions(schedule="converged", rtol=1e-6, max_iter=20000)


CASES = {
    "3 vs 2 labels": ((30, 30, 30), (25, 25)),
    "unequal class sizes": ((12, 40, 25, 18), (9, 30, 21)),
    "single-label target": ((30, 30, 30), (40,)),
    "2 vs 5 labels": ((45, 35), (8, 12, 10, 15, 9)),
}


def _cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_value_and_gradient_match_microsoft_otdd_algorithm(case):
    source_sizes, target_sizes = CASES[case]
    xs, ys = class_blobs(source_sizes, seed=1)
    xt, yt = class_blobs(target_sizes, seed=2)
    ours_x, ref_x = xt.clone().requires_grad_(True), xt.clone().requires_grad_(True)
    ours = otdd(ours_x, yt, xs, ys)
    ref = microsoft_otdd(ref_x, yt, xs, ys)
    ours.backward()
    ref.backward()
    ours, ref = ours.detach(), ref.detach()
    assert float(ref) > 10.0  # a real gap at this scale, so the tolerance is a real one
    # The same fixed schedule, so the same number up to float32 summation order (~2e-5 seen).
    assert float(ours) == pytest.approx(float(ref), rel=1e-3)
    assert _cosine(ours_x.grad, ref_x.grad) >= 0.999
    assert float(ours_x.grad.norm()) == pytest.approx(float(ref_x.grad.norm()), rel=1e-3)


def test_per_cluster_is_orcas_loop_of_single_label_calls():
    """ORCA's stage 1: one microsoft/otdd call per k-means cluster, each cluster a single-label set."""
    xs, ys = class_blobs((30, 30, 30), seed=3)
    xt, clusters = class_blobs((14, 25, 20), seed=4)
    values, ids = OTDD().per_cluster(xt, clusters, xs, ys)
    assert ids.tolist() == [0, 1, 2]
    for k in range(3):
        rows = clusters == k
        ref = float(microsoft_otdd(xt[rows], torch.zeros(int(rows.sum())), xs, ys))
        # the batch's schedule starts from the diameter of all clusters: at most a step longer (~1e-4 seen)
        assert float(values[k]) == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("sizes", [(40,), (16, 20, 12)], ids=["one blob", "three classes"])
def test_reference_self_term_solver_equals_pot_sinkhorn(sizes):
    """The oracle's symmetric solver for OT_eps(a, a) reaches POT's alternating Sinkhorn's value."""
    x, y = class_blobs(sizes, dim=6, spread=1.0, seed=11, dtype=torch.float64)
    cost = ot.dist(x.numpy(), x.numpy(), metric="sqeuclidean") + 0.3 * (y[:, None] != y[None, :]).numpy()
    assert _entropic_ot_self(cost, 0.1) == pytest.approx(_entropic_ot(cost, 0.1), rel=1e-9)
    assert _entropic_ot_self(cost, 0.1) > 0.01  # the entropic term: nonzero for a self transport
    assert not np.allclose(_entropic_ot_self(cost, 0.1), _entropic_ot_self(cost, 0.2))


def test_converged_schedule_matches_the_pot_solved_value():
    """float32, schedule "converged" vs every OT term solved to 1e-11 in float64 (standardised features)."""
    xs, ys = class_blobs((16, 20, 12), dim=6, spread=1.0, seed=5)
    xt, yt = class_blobs((10, 14), dim=6, spread=1.0, seed=6)
    ours = float(otdd(xt + 0.1, yt, xs, ys, sinkhorn=SinkhornOptions(schedule="converged")))
    assert ours == pytest.approx(converged_otdd(xt + 0.1, yt, xs, ys), rel=1e-4)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fixed_schedule_is_within_one_percent_of_convergence(case):
    """The default fixed schedule stops short of convergence: at most 1 % below the tight float64 value."""
    source_sizes, target_sizes = CASES[case]
    xs, ys = class_blobs(source_sizes, seed=1)
    xt, yt = class_blobs(target_sizes, seed=2)
    fixed = float(otdd(xt, yt, xs, ys))
    tight = float(otdd(xt.double(), yt, xs.double(), ys, sinkhorn=TIGHT))
    assert -1e-3 <= (tight - fixed) / tight <= 1e-2


@pytest.mark.parametrize("spread, offset", [(1.0, 0.0), (10.0, 0.0), (10.0, 40.0)],
                         ids=["standardised", "spread 10", "spread 10, offset 40 (raw features)"])
def test_schedules_against_a_tight_float64_solve_at_every_scale(spread, offset):
    """Per cluster, float32: "converged" (rtol 1e-4) within 3e-4 and "fixed" within 1 % of float64 at rtol 1e-6."""
    xs, ys = class_blobs((20, 16, 24), dim=8, spread=spread, offset=offset, seed=7)
    xt, clusters = class_blobs((12, 18), dim=8, spread=spread, offset=offset, seed=8)
    tight, _ = OTDD(sinkhorn=TIGHT).per_cluster(xt.double(), clusters, xs.double(), ys)
    converged, _ = OTDD(sinkhorn=SinkhornOptions(schedule="converged")).per_cluster(xt, clusters, xs, ys)
    torch.testing.assert_close(converged.double(), tight, rtol=3e-4, atol=0)
    fixed, _ = OTDD().per_cluster(xt, clusters, xs, ys)
    gap = (tight - fixed.double()) / tight
    assert bool((gap >= -1e-3).all() and (gap <= 1e-2).all()), gap


def test_converged_schedule_warns_only_when_the_answer_is_off():
    xs, ys = class_blobs((30, 30, 30), dim=16, spread=10.0, seed=9)
    xt, yt = class_blobs((20, 20), dim=16, spread=10.0, seed=10)
    with pytest.warns(RuntimeWarning, match=r"did not converge: \d+ problem\(s\) of \d+ x \d+ points at eps=0.1 "
                                            r"stopped after 3 sweeps with the value still moving by"):
        otdd(xt, yt, xs, ys, sinkhorn=SinkhornOptions(schedule="converged", max_iter=3, check_every=1))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule='anneal' is not one of"):
        SinkhornOptions(schedule="anneal")
