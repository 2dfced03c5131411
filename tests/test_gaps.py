"""Gap metrics: null behaviour, symmetry, monotonicity in a mean shift, bootstrap and profiles."""
from __future__ import annotations

import json

import numpy as np
import ot
import pytest
import torch

from rank_estimation.gaps import (GAP_METRICS, bootstrap_ci, gap_profile, proxy_a_distance, random_directions,
                                  sliced_wasserstein)

DIM = 4
SHIFTS = (0.0, 0.5, 1.0, 2.0)

# (metric, how "~0 for two samples of one distribution" is checked): ("abs", tol) bounds |value|;
# ("rel", frac) bounds the null value by frac x the value at a one-sigma-of-the-set shift (1.0),
# for the transport metrics whose finite-sample bias is positive (see rank_estimation/gaps.py).
CASES = [
    ("mmd", ("abs", 0.005)),
    ("pad", ("abs", 0.15)),
    ("sinkhorn", ("rel", 0.1)),
    ("sliced_wasserstein", ("rel", 0.2)),
    ("otdd", ("rel", 0.25)),
]


def features(n, shift=0.0, seed=0):
    """Unit-total-variance Gaussian features (what gap_profile's standardisation produces), shifted
    along the first axis, with 3 random class labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen) / DIM ** 0.5
    x[:, 0] += shift
    return x, torch.randint(0, 3, (n,), generator=gen)


def call(name, source, target, **kw):
    (xs, ys), (xt, yt) = source, target
    if name == "otdd":
        kw.update(source_labels=ys, target_labels=yt)
    return GAP_METRICS.get(name)(xs, xt, **kw)


def test_registry_holds_every_metric():
    assert GAP_METRICS.names() == ["mmd", "mmd_source", "otdd", "pad", "sinkhorn", "sliced_w2_source",
                                   "sliced_wasserstein"]


@pytest.mark.parametrize("name, null_check", CASES, ids=[c[0] for c in CASES])
def test_null_symmetry_and_monotone_shift(name, null_check):
    source = features(300, seed=1)
    values = [call(name, source, features(250, shift, seed=2)) for shift in SHIFTS]
    kind, tol = null_check
    if kind == "abs":
        assert abs(values[0]) < tol, values
    else:
        assert 0 <= values[0] < tol * values[2], values
    assert all(b > a for a, b in zip(values, values[1:])), values
    target = features(250, 1.0, seed=2)
    forward, backward = call(name, source, target), call(name, target, source)
    assert forward == pytest.approx(backward, rel=1e-3, abs=1e-6)


def test_sliced_wasserstein_equals_pot_on_the_same_directions():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(52, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    directions = random_directions(5, 16, seed=4, dtype=torch.float64)
    ours = sliced_wasserstein(x, y, n_projections=16, seed=4)
    pot = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=directions.numpy())
    assert ours == pytest.approx(float(pot), rel=1e-10)


def test_pad_torch_backend_agrees_with_sklearn():
    xs, _ = features(400, seed=5)
    xt, _ = features(400, 0.4, seed=6)
    sk = proxy_a_distance(xs, xt, backend="sklearn")
    th = proxy_a_distance(xs, xt, backend="torch")
    assert 0.3 < sk < 1.9 and th == pytest.approx(sk, abs=0.05)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bootstrap_interval_contains_the_estimate(name):
    source, target = features(200, seed=7), features(150, 1.0, seed=8)
    kw = {"source_labels": source[1], "target_labels": target[1]} if name == "otdd" else {}
    value, lo, hi = bootstrap_ci(name, source[0], target[0], n_boot=12, alpha=0.1, seed=0, **kw)
    assert value == pytest.approx(call(name, source, target))
    assert lo < value < hi
    assert lo > 0  # a one-sigma shift is a real gap for every metric
    assert bootstrap_ci(name, source[0], target[0], n_boot=12, alpha=0.1, seed=0, **kw) == (value, lo, hi)
    assert bootstrap_ci(name, source[0], target[0], n_boot=0, **kw) == (value, value, value)


def _layers(scale=1.0):
    a_s, a_t = features(120, seed=9)[0], features(100, 0.7, seed=10)[0]
    gen = torch.Generator().manual_seed(11)
    b_s, b_t = torch.randn(120, 6, generator=gen) * 3, torch.randn(100, 6, generator=gen) * 3 + 1
    return {"blocks.0": a_s * scale, "blocks.1": b_s * scale}, {"blocks.0": a_t * scale, "blocks.1": b_t * scale}


def test_gap_profile_is_json_and_scale_free():
    src, tgt = _layers()
    labels_s, labels_t = torch.arange(120) % 3, torch.arange(100) % 2
    prof = gap_profile(src, tgt, n_boot=3, source_labels=labels_s, target_labels=labels_t)
    assert prof["layers"] == ["blocks.0", "blocks.1"] and prof["metrics"] == GAP_METRICS.names()
    again = json.loads(json.dumps(prof))
    assert again["values"]["blocks.1"]["mmd"]["value"] == prof["values"]["blocks.1"]["mmd"]["value"]
    for layer in prof["layers"]:
        for metric in prof["metrics"]:
            cell = prof["values"][layer][metric]
            assert cell["lo"] <= cell["value"] <= cell["hi"]
    src7, tgt7 = _layers(scale=7.0)
    prof7 = gap_profile(src7, tgt7, n_boot=0, source_labels=labels_s, target_labels=labels_t)
    for layer in prof["layers"]:
        assert prof7["scale"][layer] == pytest.approx(7 * prof["scale"][layer], rel=1e-5)
        for metric in prof["metrics"]:
            assert prof7["values"][layer][metric]["value"] == pytest.approx(
                prof["values"][layer][metric]["value"], rel=1e-3, abs=1e-6), (layer, metric)
    unlabelled = gap_profile(src, tgt, metrics=None)
    assert "otdd" not in unlabelled["metrics"] and unlabelled["settings"]["labelled"] is False


@pytest.mark.parametrize("call_, exc, match", [
    (lambda s, t: gap_profile(s, {"blocks.0": t["blocks.0"]}), ValueError, r"unmatched: \['blocks.1'\]"),
    (lambda s, t: gap_profile(s, t, metrics=["otdd"]), ValueError, "'otdd' needs source_labels and target_labels"),
    (lambda s, t: gap_profile(s, t, metrics=["mdd"]), KeyError, "did you mean 'mmd'"),
    (lambda s, t: gap_profile(s, t, metrics=["mmd"], metric_kwargs={"pad": {}}), ValueError, "not requested"),
    (lambda s, t: gap_profile(s, {**t, "blocks.1": t["blocks.1"] * float("nan")}), ValueError,
     r"target_feats\['blocks.1'\] contains 600 NaN"),
    (lambda s, t: GAP_METRICS.get("mmd")(s["blocks.0"], t["blocks.1"]), ValueError,
     "target has feature dimension 6 but the dimension of source is 4"),
    (lambda s, t: GAP_METRICS.get("sinkhorn")(s["blocks.0"][:0], t["blocks.0"]), ValueError, "source is empty"),
    (lambda s, t: GAP_METRICS.get("otdd")(s["blocks.0"], t["blocks.0"]), ValueError, "needs source_labels"),
    (lambda s, t: GAP_METRICS.get("pad")(s["blocks.0"], t["blocks.0"], backend="gpu"), ValueError, "backend='gpu'"),
    (lambda s, t: bootstrap_ci("mmd", s["blocks.0"], t["blocks.0"], alpha=1.5), ValueError, "alpha=1.5"),
    (lambda s, t: bootstrap_ci("otdd", s["blocks.0"], t["blocks.0"], source_labels=np.zeros(3),
                               target_labels=np.zeros(100)), ValueError, "source_labels has 3 labels"),
])
def test_bad_inputs_raise(call_, exc, match):
    src, tgt = _layers()
    with pytest.raises(exc, match=match):
        call_(src, tgt)


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    source, target = features(300, seed=12), features(250, 0.5, seed=13)
    for name, _ in CASES:
        cpu = call(name, source, target)
        gpu = call(name, tuple(t.cuda() for t in source), tuple(t.cuda() for t in target))
        # pad: the GPU runs the torch L-BFGS classifier, the CPU sklearn's -- close, not identical.
        assert gpu == pytest.approx(cpu, rel=1e-3, abs=0.05 if name == "pad" else 1e-5), name


SWIN_B_BLOCK_DIMS = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2


@pytest.mark.gpu
@pytest.mark.slow
def test_swin_b_profile_budget():
    """Stage 2's time budget: every metric at all 24 Swin-B blocks, 5000 x 5000 features, < 30 s."""
    gen = torch.Generator().manual_seed(0)
    src = {f"blocks.{i}": torch.randn(5000, d, generator=gen) for i, d in enumerate(SWIN_B_BLOCK_DIMS)}
    tgt = {k: torch.randn(5000, v.shape[1], generator=gen) + 0.1 for k, v in src.items()}
    labels = torch.arange(5000) % 10
    gap_profile({k: v[:500] for k, v in src.items()}, {k: v[:500] for k, v in tgt.items()}, device="cuda",
                source_labels=labels[:500], target_labels=labels[:500])  # warm-up
    prof = gap_profile(src, tgt, device="cuda", source_labels=labels, target_labels=labels)
    total = sum(prof["seconds"].values())
    print(prof["seconds"])
    assert total < 30, prof["seconds"]
