"""MMD (unbiased, multi-kernel) and the mean-distance objective; the mmd/l2 alignment objectives."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from orca.align import build_objective
from orca.align.mmd import (gaussian_kernel, mean_l2, mean_l2_per_cluster, median_sq_distance, mmd2_per_cluster,
                            mmd2_unbiased)


def sample(n, dim=3, shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) + shift


def test_unbiased_estimator_equals_brute_force_sums():
    x, y = sample(7, seed=1), sample(5, shift=0.5, seed=2)
    h, mult = 1.7, (0.5, 2.0)

    def k(u, v):
        d = float(((u - v) ** 2).sum())
        return np.mean([math.exp(-d / (s * h)) for s in mult])

    kxx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kyy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kxy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert float(mmd2_unbiased(x, y, multipliers=mult, bandwidth=h)) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)


def test_median_heuristic_is_the_pooled_median():
    x, y = sample(9, seed=3), sample(6, seed=4)
    z = torch.cat([x, y]).numpy()
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    off = d[np.triu_indices(len(z), k=1)]
    # torch returns the lower of the two middle values for an even count.
    assert float(median_sq_distance(x, y)) == pytest.approx(float(np.sort(off)[(len(off) - 1) // 2]), rel=1e-10)


def test_null_mean_is_zero_within_four_standard_errors():
    values = np.array([float(mmd2_unbiased(sample(40, seed=2 * r), sample(40, seed=2 * r + 1))) for r in range(60)])
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean()) < 4 * se
    assert (values < 0).any()  # unbiased: it must dip below zero under the null


def test_positive_and_growing_under_shift():
    values = [float(mmd2_unbiased(sample(60, seed=10), sample(60, shift=s, seed=11))) for s in (0.5, 1.0, 2.0)]
    assert values[0] > 0 and all(b > a for a, b in zip(values, values[1:])), values


def test_per_cluster_matches_one_call_per_cluster():
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    source = sample(25, shift=0.3, seed=6)
    index = torch.tensor([0] * 4 + [1] * 20 + [2] * 6)
    h = median_sq_distance(target, source)
    batched = mmd2_per_cluster(target, index, 3, source)
    for k in range(3):
        single = mmd2_unbiased(target[index == k], source, bandwidth=float(h))
        assert float(batched[k]) == pytest.approx(float(single), rel=1e-10)
    means = mean_l2_per_cluster(target, index, 3, source)
    for k in range(3):
        assert float(means[k]) == pytest.approx(float(mean_l2(target[index == k], source)), rel=1e-12)


def test_kernel_is_mean_over_bandwidths():
    x, y = sample(3, seed=7), sample(4, seed=8)
    k = gaussian_kernel(x, y, torch.tensor(2.0, dtype=torch.float64), (1.0, 3.0))
    d = torch.cdist(x, y) ** 2
    assert torch.allclose(k, 0.5 * (torch.exp(-d / 2.0) + torch.exp(-d / 6.0)), atol=1e-12)


@pytest.mark.parametrize("name", ["mmd", "l2"])
def test_adam_on_a_linear_embedder_reduces_the_objective(name):
    gen = torch.Generator().manual_seed(9)
    source = torch.randn(120, 4, generator=gen) + 2.0
    inputs = torch.randn(90, 6, generator=gen)
    clusters = torch.randint(0, 3, (90,), generator=gen)
    torch.manual_seed(0)
    embedder = nn.Linear(6, 4)
    objective = build_objective(name)
    opt = torch.optim.Adam(embedder.parameters(), lr=0.05)
    history = []
    for _ in range(10):
        opt.zero_grad()
        loss = objective(embedder(inputs), clusters, source)
        loss.backward()
        assert embedder.weight.grad.abs().sum() > 0
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


def test_frequency_weights_and_skipped_singletons():
    target, source = sample(11, seed=12), sample(20, shift=1.0, seed=13)
    labels = torch.tensor([5] * 6 + [9] * 4 + [2])  # cluster 2 is a singleton: skipped, weight dropped
    obj = build_objective("l2")
    values, ids, weights = obj.per_cluster(target, labels, source)
    assert ids.tolist() == [5, 9]
    assert weights.tolist() == pytest.approx([6 / 11, 4 / 11])
    expect = 6 / 11 * mean_l2(target[:6], source) + 4 / 11 * mean_l2(target[6:10], source)
    assert float(obj(target, labels, source)) == pytest.approx(float(expect), rel=1e-12)
    uniform = build_objective("l2", weighting="uniform")
    assert uniform.per_cluster(target, labels, source)[2].tolist() == pytest.approx([1 / 3, 1 / 3])


@pytest.mark.parametrize("call, match", [
    (lambda: mmd2_unbiased(sample(1), sample(5)), "x needs >= 2 samples"),
    (lambda: mmd2_unbiased(sample(5), sample(5, dim=2)), "x has feature dimension 3 but the dimension of y is 2"),
    (lambda: mmd2_unbiased(sample(5), sample(5), multipliers=(1.0, -1.0)), "multipliers"),
    (lambda: mmd2_unbiased(sample(5) * float("nan"), sample(5)), "x contains 15 NaN"),
    (lambda: build_objective("mmd")(sample(5), torch.zeros(4), sample(5)), "target_labels has 4 labels"),
    (lambda: build_objective("mmd")(sample(3), torch.arange(3), sample(5)), "fewer than min_cluster_size=2"),
    (lambda: build_objective("mmd", min_cluster_size=1), "unbiased MMD needs clusters of >= 2"),
    (lambda: build_objective("l2")(sample(0), torch.zeros(0), sample(5)), "target_feats is empty"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
