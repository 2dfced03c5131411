"""OTDD: exactness of the inner distances, agreement with the plain references, gradients, errors.

Agreement with microsoft/otdd's algorithm and the solver's convergence: tests/test_otdd_reference.py.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from orca.align import OBJECTIVES, build_objective
from orca.align.label_distances import _emd_uniform, _exact_plan, label_distances_exact, label_distances_gaussian
from orca.align.otdd import OTDD, otdd
from orca.align.sinkhorn import SinkhornOptions
from tests.otdd_reference import converged_otdd, paper_otdd

TIGHT = SinkhornOptions(schedule="converged", rtol=1e-12, max_iter=20000)
PAPER = {"cost": "full", "inner": "exact"}


def labelled(n, n_classes, dim=4, seed=0, spread=1.0, noise=0.3, dtype=torch.float64):
    """Gaussian blobs, one per class; labels cycle so every class has n // n_classes points."""
    gen = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_classes, dim, generator=gen, dtype=dtype)
    labels = torch.arange(n) % n_classes
    return means[labels] + noise * torch.randn(n, dim, generator=gen, dtype=dtype), labels


@pytest.fixture(scope="module")
def source():
    return labelled(150, 3, seed=0)


@pytest.fixture(scope="module")
def target():
    x, _ = labelled(60, 2, seed=1)
    return x + 0.3, torch.arange(60) % 2


def test_self_distance_is_zero_only_when_debiased(source):
    xs, ys = source
    debiased = float(otdd(xs, ys, xs, ys, sinkhorn=TIGHT))
    raw = float(otdd(xs, ys, xs, ys, debiased=False, sinkhorn=TIGHT))
    shifted = float(otdd(xs + 0.5, ys, xs, ys, sinkhorn=TIGHT))
    assert abs(debiased) < 1e-8 * shifted + 1e-10
    assert raw > 0.01 * shifted  # the entropic bias is real, so the debiasing is doing the work


def test_grows_monotonically_as_one_class_moves(source):
    xs, ys = source
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=xs.dtype)
    values = []
    for t in (0.0, 0.25, 0.5, 1.0, 2.0):
        moved = xs.clone()
        moved[ys == 0] += t * direction
        values.append(float(otdd(moved, ys, xs, ys, sinkhorn=TIGHT)))
    assert abs(values[0]) < 1e-8
    assert all(b > a for a, b in zip(values, values[1:])), values


def _bures_scipy(x1, x2):
    """Independent W_2^2 between Gaussians fitted to two clouds (unbiased covariances, scipy sqrtm)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1)
    cross = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))


@pytest.mark.parametrize("per_class", [40, 4], ids=["n>d (eigh route)", "n<d (nuclear-norm route)"])
def test_gaussian_inner_equals_bures_closed_form(per_class):
    gen = np.random.default_rng(0)
    dim = 6
    clouds, labels = [], []
    for c in range(3):
        mix = gen.normal(size=(dim, dim)) / math.sqrt(dim)
        clouds.append(gen.normal(size=(per_class, dim)) @ mix + gen.normal(size=dim))
        labels += [c] * per_class
    x = torch.tensor(np.concatenate(clouds))
    y = torch.tensor(labels)
    got = label_distances_gaussian(x[y < 2], y[y < 2], x[y == 2], y[y == 2])
    self_got = label_distances_gaussian(x, y)
    for i in range(2):
        assert float(got[i, 0]) == pytest.approx(_bures_scipy(clouds[i], clouds[2]), rel=1e-6, abs=1e-9)
    for i, j in itertools.product(range(3), repeat=2):
        expect = 0.0 if i == j else _bures_scipy(clouds[i], clouds[j])
        assert float(self_got[i, j]) == pytest.approx(expect, rel=1e-6, abs=1e-9)


def test_exact_inner_equals_brute_force_assignment():
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y1 = torch.tensor([7] * 5 + [9] * 5)  # arbitrary label values: classes in sorted order
    got = label_distances_exact(x1, y1, x2, torch.zeros(5, dtype=torch.long))
    for c in range(2):
        u = x1[5 * c:5 * c + 5]
        cost = ((u[:, None] - x2[None]) ** 2).sum(-1)
        brute = min(sum(cost[i, p[i]] for i in range(5)) / 5 for p in itertools.permutations(range(5)))
        assert float(got[c, 0]) == pytest.approx(float(brute), rel=1e-10)
    self_d = label_distances_exact(x1, y1)
    assert float(self_d[0, 0]) == 0.0 and float(self_d[0, 1]) == pytest.approx(float(self_d[1, 0]))


@pytest.mark.parametrize("sizes", [(40, 40), (7, 7), (12, 30), (30, 12), (1, 5)],
                         ids=["equal (assignment)", "equal small", "unequal (simplex)", "transposed", "one point"])
def test_exact_plan_is_optimal_and_feasible(sizes):
    """The fast plan (assignment / reduced-cost simplex) has uniform marginals and emd2's value."""
    import ot

    gen = np.random.default_rng(sum(sizes))
    for trial in range(3):
        u = gen.normal(size=(sizes[0], 6)) + gen.normal(size=6) * 3  # an offset, as between class clouds
        v = gen.normal(size=(sizes[1], 6)) * (1 + trial)
        cost = ot.dist(u, v, metric="sqeuclidean")
        rows, cols, mass = _exact_plan(cost)
        plan = np.zeros_like(cost)
        np.add.at(plan, (rows, cols), mass)
        np.testing.assert_allclose(plan.sum(1), 1 / sizes[0], rtol=1e-12)
        np.testing.assert_allclose(plan.sum(0), 1 / sizes[1], rtol=1e-12)
        assert float(mass @ cost[rows, cols]) == pytest.approx(_emd_uniform(u, v), rel=1e-9)


def test_exact_inner_equals_plain_emd_and_threads_do_not_matter():
    """label_distances_exact (assignment for equal class sizes, simplex otherwise, threaded) == POT emd2."""
    x1, y1 = labelled(90, 3, dim=5, seed=6, spread=2.0, noise=0.5)  # 30 points per class
    x2, y2 = labelled(40, 4, dim=5, seed=7, spread=2.0, noise=0.5)
    y2 = torch.where(torch.arange(40) < 4, torch.tensor(0), y2)  # class sizes 13, 9, 9, 9: both solvers
    for args in ((x1, y1), (x1, y1, x2, y2), (x2, y2)):
        xa, ya = args[0].numpy(), args[1].numpy()
        xb, yb = (args[2].numpy(), args[3].numpy()) if len(args) > 2 else (xa, ya)
        ca, cb = np.unique(ya), np.unique(yb)
        plain = np.array([[_emd_uniform(xa[ya == i], xb[yb == j]) for j in cb] for i in ca])
        if len(args) == 2:
            np.fill_diagonal(plain, 0.0)
        serial = label_distances_exact(*args, threads=1)
        np.testing.assert_allclose(serial.numpy(), plain, rtol=1e-9, atol=0)
        assert torch.equal(label_distances_exact(*args, threads=3), serial)
        assert torch.equal(label_distances_exact(*args, threads=None), serial)
        grad = label_distances_exact(*args, differentiable=True, threads=3)
        torch.testing.assert_close(grad, serial, rtol=1e-12, atol=1e-12)


def test_otdd_threads_do_not_change_values(source, target):
    xs, ys = source
    xt, yt = target
    one = OTDD(inner="exact", inner_threads=1)
    many = OTDD(inner="exact", inner_threads=4)
    assert float(one.distance(xt, yt, xs, ys)) == float(many.distance(xt, yt, xs, ys))
    assert torch.equal(one.per_cluster(xt, yt, xs, ys)[0], many.per_cluster(xt, yt, xs, ys)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_convention_matches_plain_reference(source, target, dtype):
    """cost='full', inner='exact' is the paper's OTDD (POT emd per label pair, POT Sinkhorn, converged)."""
    xs, ys = source
    xt, yt = target
    converged = SinkhornOptions(schedule="converged")
    ours = float(otdd(xt.to(dtype), yt, xs.to(dtype), ys, sinkhorn=converged, **PAPER))
    ref = paper_otdd(xt, yt, xs, ys)
    assert ours == pytest.approx(ref, rel=1e-3 if dtype == torch.float32 else 1e-5)
    assert ref > 0.1  # a real gap, so the relative check is meaningful


def test_per_cluster_batch_equals_separate_calls(source):
    xs, ys = source
    gen = torch.Generator().manual_seed(5)
    xt = torch.randn(47, 4, generator=gen, dtype=torch.float64) * 0.5
    clusters = torch.tensor([3] * 5 + [8] * 30 + [11] * 12)  # unequal sizes exercise the padding
    solver = OTDD(sinkhorn=TIGHT)
    values, ids = solver.per_cluster(xt, clusters, xs, ys)
    assert ids.tolist() == [3, 8, 11]
    for value, cid in zip(values, ids):
        members = xt[clusters == cid]
        single = otdd(members, torch.zeros(len(members)), xs, ys, sinkhorn=TIGHT)
        assert float(value) == pytest.approx(float(single), rel=1e-7)
    assert float(values[0]) == pytest.approx(converged_otdd(xt[:5], torch.zeros(5), xs, ys), rel=1e-4)


def test_source_terms_are_cached_per_source_tensor(source, monkeypatch):
    xs, ys = source
    xs = xs.clone()
    solver = OTDD()
    calls = []
    real = solver._inner
    monkeypatch.setattr(solver, "_inner", lambda *a, **k: calls.append(len(a)) or real(*a, **k))
    xt = xs[:20] + 0.1
    solver.per_cluster(xt, torch.zeros(20), xs, ys)
    solver.per_cluster(xt + 0.1, torch.zeros(20), xs, ys)
    assert calls.count(1) == 1 and calls.count(2) == 2  # source-source label distances computed once
    xs.add_(0.0)  # an in-place write bumps the version: the cache must not survive it
    solver.per_cluster(xt, torch.zeros(20), xs, ys)
    assert calls.count(1) == 2


def _directional_fd(fn, x, direction, h=1e-5):
    with torch.no_grad():
        return float((fn(x + h * direction) - fn(x - h * direction)) / (2 * h))


def _first_set_shape(prepared):
    return tuple(prepared.points.shape) if hasattr(prepared, "points") else tuple(prepared[0].shape)


@pytest.mark.parametrize("inner", ["sinkhorn", "exact", "gaussian"])
def test_gradient_matches_finite_differences(source, target, inner):
    xs, ys = source
    xt, yt = target
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(xt.shape, generator=gen, dtype=xt.dtype)
    # Full gradient (inner label distances differentiated through their fixed plans / closed form).
    full = OTDD(inner=inner, inner_grad=True, sinkhorn=TIGHT)
    for fn in (lambda x: full.distance(x, yt, xs, ys), lambda x: full.per_cluster(x, yt, xs, ys)[0].sum()):
        x = xt.clone().requires_grad_(True)
        fn(x).backward()
        assert float((x.grad * direction).sum()) == pytest.approx(_directional_fd(fn, xt, direction), rel=1e-4)
    # ORCA's gradient: label distances frozen, so compare with a finite difference that freezes them.
    frozen = OTDD(inner=inner, sinkhorn=TIGHT)
    w = {}
    real = frozen._inner

    def memo(*a, **k):  # the label distances at xt, whatever x is passed later
        key = (len(a), _first_set_shape(a[0]))
        if key not in w:
            w[key] = real(*a, **k)
        return w[key]

    frozen._inner = memo
    fn = lambda x: frozen.distance(x, yt, xs, ys)  # noqa: E731
    x = xt.clone().requires_grad_(True)
    fn(x).backward()
    assert float((x.grad * direction).sum()) == pytest.approx(_directional_fd(fn, xt, direction), rel=1e-4)


def test_padding_gives_finite_gradients(source):
    xs, ys = source
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(31, 4, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
    clusters = torch.tensor([0] * 2 + [1] * 29)
    values, _ = OTDD().per_cluster(x, clusters, xs, ys)
    values.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[:2].abs().sum() > 0


def test_adam_on_a_linear_embedder_reduces_the_objective(source):
    xs, ys = source
    xs, gen = xs.float(), torch.Generator().manual_seed(2)
    inputs = torch.randn(80, 6, generator=gen)
    clusters = torch.randint(0, 3, (80,), generator=gen)
    torch.manual_seed(0)
    embedder = nn.Linear(6, 4)
    objective = build_objective("otdd")
    opt = torch.optim.Adam(embedder.parameters(), lr=0.05)
    history = []
    for _ in range(8):
        opt.zero_grad()
        loss = objective(embedder(inputs), clusters, xs, ys)
        loss.backward()
        assert embedder.weight.grad.abs().sum() > 0 and embedder.bias.grad.abs().sum() > 0
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


def test_objective_registry_names_and_errors():
    assert OBJECTIVES.names() == ["l2", "mmd", "otdd"]
    with pytest.raises(KeyError, match="did you mean 'otdd'"):
        build_objective("otd")
    with pytest.raises(ValueError, match="weighting"):
        build_objective("otdd", weighting="size")


@pytest.mark.parametrize("case, match", [
    ("nan", "target_feats contains 1 NaN"),
    ("single_source_label", "source_labels has a single distinct label"),
    ("dim", "target_feats has feature dimension 3 but the dimension of source_feats is 4"),
    ("empty_target", "target_feats is empty"),
    ("empty_source", "source_feats is empty"),
    ("label_length", "target_labels has 59 labels but target_feats has 60 rows"),
    ("float_labels", "target_labels must hold integer class labels"),
    ("not_2d", r"source_feats must be 2-D \[n, d\]"),
])
def test_bad_inputs_raise_with_the_argument_name(source, target, case, match):
    xs, ys = source
    xt, yt = target
    args = {"target_feats": xt.clone(), "target_labels": yt, "source_feats": xs, "source_labels": ys}
    if case == "nan":
        args["target_feats"][3, 1] = float("nan")
    elif case == "single_source_label":
        args["source_labels"] = torch.zeros_like(ys)
    elif case == "dim":
        args["target_feats"] = xt[:, :3]
    elif case == "empty_target":
        args["target_feats"], args["target_labels"] = xt[:0], yt[:0]
    elif case == "empty_source":
        args["source_feats"], args["source_labels"] = xs[:0], ys[:0]
    elif case == "label_length":
        args["target_labels"] = yt[:-1]
    elif case == "float_labels":
        args["target_labels"] = yt.double() + 0.5
    elif case == "not_2d":
        args["source_feats"] = xs[:, 0]
    with pytest.raises(ValueError, match=match):
        otdd(**args)
    with pytest.raises(ValueError, match=match):
        build_objective("otdd")(**args)


def test_option_errors(source):
    xs, ys = source
    with pytest.raises(ValueError, match="inner='lp' is not one of"):
        OTDD(inner="lp")
    with pytest.raises(ValueError, match="cost='quarter' is not one of"):
        OTDD(cost="quarter")
    with pytest.raises(ValueError, match="reg=0"):
        OTDD(reg=0)
    with pytest.raises(ValueError, match="inner_threads=0"):
        OTDD(inner_threads=0)
    with pytest.raises(ValueError, match="needs >= 2 samples per class"):
        otdd(xs[:3], torch.tensor([0, 1, 1]), xs, ys, inner="gaussian")


@pytest.mark.gpu
def test_cuda_matches_cpu(source, target):
    xs, ys = (t.float() if t.is_floating_point() else t for t in source)
    xt, yt = target[0].float(), target[1]
    cpu, _ = OTDD().per_cluster(xt, yt, xs, ys)
    x = xt.cuda().requires_grad_(True)
    gpu, _ = OTDD().per_cluster(x, yt.cuda(), xs.cuda(), ys.cuda())
    gpu.sum().backward()
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-3) and torch.isfinite(x.grad).all()
    assert float(otdd(xt.cuda(), yt.cuda(), xs.cuda(), ys.cuda(), inner="gaussian")) == pytest.approx(
        float(otdd(xt, yt, xs, ys, inner="gaussian")), rel=1e-3)
