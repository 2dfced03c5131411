"""Maximum mean discrepancy (multi-kernel Gaussian, unbiased) and the plain mean-distance objective.

Kernel: k(x, y) = mean_s exp(-||x - y||^2 / (s * h)), with h the median squared pairwise distance
of the pooled sample (the median heuristic) and s over ``multipliers``. Why several bandwidths: one
median bandwidth is blind to differences at much smaller or larger scales, and while stage 1 runs
the target cloud moves from far away to on top of the source. Averaging (not summing) keeps the
value's scale independent of the number of kernels.

The bandwidth h is detached: it is a statistic of the current batch, not a parameter, and letting
gradients through it would reward the embedder for inflating all distances.

Estimator: unbiased MMD^2 (Gretton et al., JMLR 2012, eq. 3), which drops the i = j terms. Its
mean is 0 when both samples come from one distribution, so it can be slightly negative.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from orca.align.checks import check_features

DEFAULT_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _sqdist(x: Tensor, y: Tensor) -> Tensor:
    centre = y.detach().mean(0)  # centring avoids float32 cancellation in the expansion
    x, y = x - centre, y - centre
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T).clamp_min(0)


def _check_multipliers(multipliers: Sequence[float]) -> tuple:
    mult = tuple(float(s) for s in multipliers)
    if not mult or any(not s > 0 for s in mult):
        raise ValueError(f"multipliers={multipliers!r} must be a non-empty sequence of positive numbers")
    return mult


def median_sq_distance(x: Tensor, y: Optional[Tensor] = None, *, max_samples: int = 1024, seed: int = 0) -> Tensor:
    """Median squared pairwise distance of the pooled sample (detached), for the median heuristic.

    Why a subsample: the median over 10,000 pooled points would sort 5e7 distances every step;
    1,024 points pin it to within a few percent.

    Args:
        x: ``[n, d]``.
        y: ``[m, d]`` or None.
        max_samples: pooled points used at most (seeded choice without replacement).
        seed: seed of that choice.

    Returns:
        0-dim tensor, > 0 (falls back to the mean, then 1, if the median is 0).
    """
    z = x.detach() if y is None else torch.cat([x.detach(), y.detach()], 0)
    if z.shape[0] > max_samples:
        gen = torch.Generator().manual_seed(seed)
        z = z[torch.randperm(z.shape[0], generator=gen)[:max_samples].to(z.device)]
    d = _sqdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    off = d[iu[0], iu[1]]
    if off.numel() == 0:
        return torch.ones((), dtype=z.dtype, device=z.device)
    med = off.median()
    if med <= 0:  # many duplicates: the median heuristic breaks down, keep a usable scale
        med = off.mean()
    return med if med > 0 else torch.ones((), dtype=z.dtype, device=z.device)


def gaussian_kernel(x: Tensor, y: Tensor, bandwidth: Tensor, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS) -> Tensor:
    """Multi-bandwidth Gaussian kernel matrix.

    Args:
        x: ``[n, d]``.
        y: ``[m, d]``.
        bandwidth: 0-dim squared-distance scale h.
        multipliers: scales s; the kernel is the mean over s of exp(-D / (s h)).

    Returns:
        ``[n, m]``.
    """
    d = _sqdist(x, y)
    k = torch.zeros_like(d)
    for s in multipliers:
        k = k + torch.exp(-d / (s * bandwidth))
    return k / len(multipliers)


def _off_diagonal_mean(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def mmd2_unbiased(x, y, *, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, bandwidth: Optional[float] = None,
                  max_median_samples: int = 1024, seed: int = 0) -> Tensor:
    """Unbiased multi-kernel MMD^2 between two samples.

    Args:
        x: ``[n, d]``, n >= 2 (may require grad).
        y: ``[m, d]``, m >= 2.
        multipliers: bandwidth multipliers of the median heuristic.
        bandwidth: fixed squared-distance scale h instead of the pooled median.
        max_median_samples, seed: subsample for the median heuristic.

    Returns:
        0-dim tensor (may be slightly negative when the samples match).
    """
    y = check_features("y", y)
    x = check_features("x", x, y.shape[1], "y")
    for name, z in (("x", x), ("y", y)):
        if z.shape[0] < 2:
            raise ValueError(f"{name} needs >= 2 samples for the unbiased MMD estimator, got {z.shape[0]}")
    mult = _check_multipliers(multipliers)
    y = y.to(device=x.device, dtype=x.dtype)
    h = (median_sq_distance(x, y, max_samples=max_median_samples, seed=seed) if bandwidth is None
         else torch.as_tensor(float(bandwidth), dtype=x.dtype, device=x.device))
    kxx = _off_diagonal_mean(gaussian_kernel(x, x, h, mult))
    kyy = _off_diagonal_mean(gaussian_kernel(y, y, h, mult))
    kxy = gaussian_kernel(x, y, h, mult).mean()
    return kxx + kyy - 2.0 * kxy


def mmd2_per_cluster(target_feats: Tensor, index: Tensor, n_clusters: int, source_feats: Tensor, *,
                     multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, max_median_samples: int = 1024,
                     seed: int = 0) -> Tensor:
    """Unbiased MMD^2 of every target cluster against the whole source, in one pass.

    Why batched: ORCA evaluates one MMD per cluster; since the clusters partition the target,
    the [n, n] and [n, m] kernel matrices are computed once and summed per cluster by a one-hot
    matmul. One bandwidth (pooled median of all targets and sources) is shared by all clusters.

    Args:
        target_feats: ``[n, d]`` (may require grad).
        index: ``[n]`` cluster index in 0..n_clusters-1; every cluster has >= 2 members.
        n_clusters: K.
        source_feats: ``[m, d]``, m >= 2.
        multipliers, max_median_samples, seed: as in :func:`mmd2_unbiased`.

    Returns:
        ``[K]`` MMD^2 values.
    """
    mult = _check_multipliers(multipliers)
    xs = source_feats.detach().to(device=target_feats.device, dtype=target_feats.dtype)
    h = median_sq_distance(target_feats, xs, max_samples=max_median_samples, seed=seed)
    onehot = torch.nn.functional.one_hot(index, n_clusters).to(target_feats.dtype)  # [n, K]
    counts = onehot.sum(0)
    k_tt = gaussian_kernel(target_feats, target_feats, h, mult)
    within = (onehot.T @ k_tt @ onehot).diagonal() - onehot.T @ k_tt.diagonal()
    kxx = within / (counts * (counts - 1))
    kxy = (onehot.T @ gaussian_kernel(target_feats, xs, h, mult).sum(1)) / (counts * xs.shape[0])
    kyy = _off_diagonal_mean(gaussian_kernel(xs, xs, h, mult))
    return kxx + kyy - 2.0 * kxy


def mean_l2(x, y) -> Tensor:
    """Squared distance between the sample means, ||mean(x) - mean(y)||^2 (the ``l2`` objective).

    Args:
        x: ``[n, d]`` (may require grad).
        y: ``[m, d]``.

    Returns:
        0-dim tensor.
    """
    y = check_features("y", y)
    x = check_features("x", x, y.shape[1], "y")
    return (x.mean(0) - y.to(device=x.device, dtype=x.dtype).mean(0)).pow(2).sum()


def mean_l2_per_cluster(target_feats: Tensor, index: Tensor, n_clusters: int, source_feats: Tensor) -> Tensor:
    """:func:`mean_l2` of every target cluster against the source mean.

    Args:
        target_feats: ``[n, d]``.
        index: ``[n]`` cluster index in 0..n_clusters-1.
        n_clusters: K.
        source_feats: ``[m, d]``.

    Returns:
        ``[K]``.
    """
    onehot = torch.nn.functional.one_hot(index, n_clusters).to(target_feats.dtype)
    means = (onehot.T @ target_feats) / onehot.sum(0, keepdim=True).T
    src = source_feats.detach().to(device=target_feats.device, dtype=target_feats.dtype).mean(0)
    return (means - src).pow(2).sum(1)


__all__ = ["DEFAULT_MULTIPLIERS", "gaussian_kernel", "mean_l2", "mean_l2_per_cluster", "median_sq_distance",
           "mmd2_per_cluster", "mmd2_unbiased"]
