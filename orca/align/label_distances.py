"""Label-to-label distances of OTDD: how far apart two classes are, as point clouds.

OTDD prices moving a sample of class y to one of class y' by a distance W(y, y') between the two
class-conditional feature clouds. Three inner distances, all on the squared Euclidean cost
|x - x'|^2 (not halved; OTDD's outer cost halves the sum, see ``orca.align.otdd``):

    sinkhorn  debiased Sinkhorn divergence S_eps(P_y, P_y') at eps = 0.1. This is what
              microsoft/otdd computes for ``inner_ot_method='exact'`` (its default
              ``inner_ot_loss='sinkhorn'``, ``inner_ot_entreg=0.1``, with ORCA's
              ``inner_ot_debiased=True``), so it is the default. All label pairs are solved as one
              padded batch on the features' device, and each class's self-term OT_eps(P, P) is
              solved once and shared by every pair it appears in (microsoft/otdd solves both
              self-terms again for every pair).
    exact     the exact squared 2-Wasserstein distance (the optimal transport LP), as the OTDD
              paper defines it: an optimal assignment for equal class sizes, POT's network
              simplex otherwise, label pairs on a CPU thread pool.
    gaussian  the Bures-Wasserstein closed form on class means and covariances.

At eps = 0.1 and squared distances of order 1 the Sinkhorn divergence and the LP differ by ~1 %;
at squared distances of 1e2..1e4 (raw embedder features) by far less.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from orca.align.checks import encode_labels
from orca.align.sinkhorn import (SinkhornOptions, diameter, masked_dot, sinkhorn_potentials, sinkhorn_self_potential,
                                 softmin_cols, softmin_rows)
from orca.runs import usable_cpus

INNER_METHODS = ("sinkhorn", "exact", "gaussian")


# ----------------------------------------------------------------------------- shared helpers
def sqdist(x: Tensor, y: Tensor) -> Tensor:
    """Squared distances ``[B, n, m]`` between ``x [B, n, d]`` and ``y [B or 1, m, d]``."""
    x2 = x.pow(2).sum(-1).unsqueeze(-1)
    y2 = y.pow(2).sum(-1).unsqueeze(-2)
    return (x2 + y2 - 2.0 * x @ y.transpose(-1, -2)).clamp_min(0)


def pad_groups(index: Tensor, n_groups: int) -> Tuple[Tensor, Tensor]:
    """Row indices ``[K, n_max]`` of each group's members, and a validity mask, for batching."""
    counts = torch.bincount(index, minlength=n_groups)
    n_max = int(counts.max())
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(index.numel(), device=index.device) - starts[index[order]]
    rows = torch.zeros(n_groups, n_max, dtype=torch.long, device=index.device)
    mask = torch.zeros(n_groups, n_max, dtype=torch.bool, device=index.device)
    rows[index[order], pos] = order
    mask[index[order], pos] = True
    return rows, mask


def log_uniform(mask: Tensor, dtype) -> Tensor:
    """Log weights ``1 / n_k`` on each group's valid entries, ``-inf`` on padding."""
    counts = mask.sum(-1, keepdim=True).to(dtype)
    return torch.where(mask, -counts.log(), torch.full_like(counts, -math.inf).expand_as(mask))


# ----------------------------------------------------------------------------- exact (LP)
def _class_rows(index: np.ndarray, n_classes: int, max_samples: Optional[int], seed: int) -> List[np.ndarray]:
    """Row indices of every class, optionally a seeded subsample of at most ``max_samples``."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        rows = np.flatnonzero(index == c)
        if max_samples is not None and rows.size > max_samples:
            rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
        out.append(rows)
    return out


def _emd(cost: np.ndarray, plan: bool = False):
    """POT's network simplex between uniform weights: the W_2^2 value, or the plan with ``plan=True``."""
    import ot

    a = np.full(cost.shape[0], 1.0 / cost.shape[0])
    b = np.full(cost.shape[1], 1.0 / cost.shape[1])
    # The default iteration cap (1e5) is hit by ~500 x 500 clouds; a truncated simplex is not exact.
    iters = max(10 ** 7, 50 * cost.size)
    if plan:
        return ot.emd(a, b, cost, numItermax=iters)
    return float(ot.emd2(a, b, cost, numItermax=iters))


def _emd_uniform(u: np.ndarray, v: np.ndarray) -> float:
    """Exact W_2^2 between uniform clouds, plainly: the network simplex on the squared distances."""
    import ot

    return _emd(ot.dist(u, v, metric="sqeuclidean"))


def _exact_plan(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An optimal plan between uniform weights on the rows and on the columns of ``cost``.

    Returns its nonzero entries as ``(rows, cols, mass)``, so the W_2^2 value is
    ``mass @ cost[rows, cols]``. Exact, and faster than ``_emd`` on the same cost:

    * equal sizes n: the uniform transport polytope is the Birkhoff polytope scaled by 1/n, whose
      vertices are permutations, so an optimal assignment (scipy's shortest augmenting path) is an
      optimal plan;
    * row then column minima are subtracted first. With both marginals fixed this shifts every
      feasible plan's cost by the same constant, so the optimal plans do not change; but both
      solvers start from zero duals, and squared distances between class clouds carry large row
      and column constants (squared norms, the class-mean offset) that they would first have to
      work off.

    Measured per pair on one core, class clouds of scripts/bench_otdd.py: 500 x 500 simplex 59 ms
    -> assignment 61 ms -> assignment on reduced costs 15 ms; 128 x 128 4.5 -> 2.8 -> 1.0 ms;
    100 x 500 (simplex only) 20 -> 15 ms on reduced costs.
    """
    from scipy.optimize import linear_sum_assignment

    reduced = cost - cost.min(1, keepdims=True)
    reduced -= reduced.min(0, keepdims=True)
    if cost.shape[0] == cost.shape[1]:
        rows, cols = linear_sum_assignment(reduced)
        return rows, cols, np.full(rows.size, 1.0 / rows.size)
    plan = _emd(reduced, plan=True)
    rows, cols = np.nonzero(plan)
    return rows, cols, plan[rows, cols]


def _parallel_map(fn, items: list, threads: Optional[int]) -> list:
    """``[fn(x) for x in items]`` on ``threads`` worker threads (None: one per usable CPU), BLAS at 1.

    Why threads suffice: POT's network simplex and scipy's assignment release the GIL while they
    solve (and numpy in its array loops), so label pairs run truly in parallel. Why BLAS at one
    thread, even when serial: each cost matrix is one small product, after which OpenBLAS's pool
    threads busy-wait on the cores the solver needs -- that made serial label distances 5x slower
    on a loaded 2-core machine -- and concurrent products from several workers would queue on
    OpenBLAS's lock anyway.
    """
    from threadpoolctl import threadpool_limits

    workers = min(threads or usable_cpus(), len(items))
    with threadpool_limits(1, user_api="blas"):
        if workers <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


def label_distances_exact(x1, y1, x2=None, y2=None, *, max_samples: Optional[int] = None,
                          seed: int = 0, differentiable: bool = False, threads: Optional[int] = None) -> Tensor:
    """Exact squared 2-Wasserstein distances between every class of set 1 and every class of set 2.

    Every label pair is an independent exact OT problem on CPU (float64 squared Euclidean cost):
    an optimal assignment for equal class sizes, POT's network simplex otherwise (see
    :func:`_exact_plan`), solved on a thread pool. With ``x2 is None`` the set is compared with
    itself, so only the upper triangle is solved and the diagonal is exactly 0.

    Args:
        x1: features ``[n1, d]``.
        y1: labels ``[n1]``; classes are taken in sorted label order.
        x2: features ``[n2, d]`` or None (= set 1).
        y2: labels ``[n2]`` or None.
        max_samples: cap on points per class (seeded subsample); None uses all.
        seed: seed of that subsample.
        differentiable: return sum_ij P_ij ||x1_i - x2_j||^2 with the optimal plans P held fixed, as
            a tensor on ``x1``'s device that carries gradients to ``x1`` and ``x2`` (the envelope
            theorem: a valid gradient of the LP value wherever the optimal plan is unique).
        threads: worker threads for the label pairs; None = one per CPU this process may use,
            1 = serial. The values do not depend on it.

    Returns:
        ``[C1, C2]`` W_2^2 values: float64 on CPU, or ``x1``'s dtype and device if differentiable.
    """
    import ot

    same = x2 is None
    if same:
        x2, y2 = x1, y1
    a = x1.detach().cpu().double().numpy()
    b = a if same else x2.detach().cpu().double().numpy()
    _, i1 = encode_labels(torch.as_tensor(y1).cpu())
    _, i2 = (None, i1) if same else encode_labels(torch.as_tensor(y2).cpu())
    c1, c2 = int(i1.max()) + 1, int(i2.max()) + 1
    rows1 = _class_rows(i1.numpy(), c1, max_samples, seed)
    rows2 = rows1 if same else _class_rows(i2.numpy(), c2, max_samples, seed)
    pairs = [(i, j) for i in range(c1) for j in range(i + 1 if same else 0, c2)]

    def solve(pair):
        i, j = pair
        cost = ot.dist(a[rows1[i]], b[rows2[j]], metric="sqeuclidean")
        r, c, mass = _exact_plan(cost)
        return rows1[i][r], rows2[j][c], mass, float(mass @ cost[r, c])

    entries = {}
    for (i, j), (r, c, mass, value) in zip(pairs, _parallel_map(solve, pairs, threads)):
        if differentiable:  # the plan's cost through exact differences: no cancellation, gradients to both sides
            r, c = torch.as_tensor(r, device=x1.device), torch.as_tensor(c, device=x1.device)
            mass = torch.as_tensor(mass, dtype=x1.dtype, device=x1.device)
            value = (mass * (x1[r] - x2[c].to(x1)).pow(2).sum(-1)).sum()
        entries[i, j] = value
        if same:
            entries[j, i] = value
    if not differentiable:
        return torch.tensor([[entries.get((i, j), 0.0) for j in range(c2)] for i in range(c1)], dtype=torch.float64)
    zero = x1.new_zeros(())
    return torch.stack([torch.stack([entries.get((i, j), zero) for j in range(c2)]) for i in range(c1)])


# ----------------------------------------------------------------------------- gaussian
def _class_moments(x: Tensor, index: Tensor, n_classes: int, arg: str):
    counts = torch.bincount(index, minlength=n_classes)
    if int(counts.min()) < 2:
        raise ValueError(f"{arg}: the Gaussian inner distance needs >= 2 samples per class "
                         f"(class sizes {counts.tolist()}); use inner='exact'")
    means = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    means = means / counts[:, None].to(x.dtype)
    centred = []
    for c in range(n_classes):
        rows = x[index == c] - means[c]
        centred.append(rows / math.sqrt(rows.shape[0] - 1))  # unbiased: S = A^T A
    return means, centred


def _psd_sqrt(s: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)


def _bures_cross_trace(a1: Tensor, a2: Tensor, s1_sqrt: Optional[Tensor], s2: Tensor) -> Tensor:
    """tr((S1^1/2 S2 S1^1/2)^1/2) for S_k = A_k^T A_k, through whichever side is smaller.

    The trace equals the nuclear norm of A1 A2^T (its nonzero singular values are those of
    S1^1/2 S2^1/2), an [n1, n2] matrix: far cheaper than a [d, d] square root when classes hold
    fewer samples than the feature dimension (deep Swin blocks: d = 1024, ~500 per class).
    """
    if min(a1.shape[0], a2.shape[0]) < a1.shape[1]:
        return torch.linalg.svdvals(a1 @ a2.T).sum()
    m = s1_sqrt @ s2 @ s1_sqrt
    return torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()


def label_distances_gaussian(x1, y1, x2=None, y2=None, *, differentiable: bool = False) -> Tensor:
    """Bures-Wasserstein (Gaussian-approximation) W_2^2 between the classes of two sets.

    W^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) with unbiased class covariances,
    computed in float64 on the features' device.

    Args:
        x1: features ``[n1, d]``.
        y1: labels ``[n1]``; classes in sorted label order, each with >= 2 samples.
        x2: features ``[n2, d]`` or None (= set 1; diagonal is then exactly 0).
        y2: labels ``[n2]`` or None.
        differentiable: keep the autograd graph to ``x1``/``x2`` (eigh/svd backward; undefined
            where eigenvalues or singular values coincide).

    Returns:
        ``[C1, C2]`` float64 tensor.
    """
    same = x2 is None
    x1 = (x1 if differentiable else x1.detach()).double()
    _, i1 = encode_labels(torch.as_tensor(y1, device=x1.device))
    c1 = int(i1.max()) + 1
    mu1, a1 = _class_moments(x1, i1, c1, "labels of set 1")
    if same:
        mu2, a2, c2 = mu1, a1, c1
    else:
        x2 = (x2 if differentiable else x2.detach()).double().to(x1.device)
        _, i2 = encode_labels(torch.as_tensor(y2, device=x1.device))
        c2 = int(i2.max()) + 1
        mu2, a2 = _class_moments(x2, i2, c2, "labels of set 2")
    d = x1.shape[1]
    need_sqrt = any(a.shape[0] >= d for a in a1)
    s1 = [a.T @ a for a in a1]
    s2 = s1 if same else [a.T @ a for a in a2]
    s1_sqrt = [_psd_sqrt(s) if need_sqrt else None for s in s1]
    entries = {}
    for i in range(c1):
        for j in range(i + 1 if same else 0, c2):
            cross = _bures_cross_trace(a1[i], a2[j], s1_sqrt[i], s2[j])
            val = (mu1[i] - mu2[j]).pow(2).sum() + s1[i].trace() + s2[j].trace() - 2 * cross
            entries[i, j] = val.clamp_min(0)
            if same:
                entries[j, i] = entries[i, j]
    zero = x1.new_zeros(())
    return torch.stack([torch.stack([entries.get((i, j), zero) for j in range(c2)]) for i in range(c1)])


# ----------------------------------------------------------------------------- sinkhorn (ORCA's)
class ClassClouds:
    """The classes of one labelled set as a padded batch ``[C, n_max, d]``, with their self-terms.

    Why an object: a set's self-terms OT_eps(P_c, P_c) enter every label pair of that class, and
    the source set's are reused across a whole stage-1 run.

    Args:
        x: features ``[n, d]``.
        index: class index ``[n]`` in 0..C-1.
        n_classes: C.
        max_samples: cap on points per class (seeded subsample); None uses all.
        seed: seed of that subsample.
    """

    def __init__(self, x: Tensor, index: Tensor, n_classes: int, max_samples: Optional[int] = None, seed: int = 0):
        if max_samples is not None:
            rows = _class_rows(index.cpu().numpy(), n_classes, max_samples, seed)
            keep = torch.as_tensor(np.concatenate(rows), device=x.device)
            x, index = x[keep], index[keep]
        rows, mask = pad_groups(index, n_classes)
        self.points = x[rows]                                   # [C, n, d]
        self.centre = x.detach().mean(0)
        self.log_w = log_uniform(mask, x.dtype)                 # [C, n]
        self.n_classes = n_classes
        self._self_terms: Optional[Tuple[float, Tensor]] = None

    def self_terms(self, reg: float, opts: SinkhornOptions, differentiable: bool, diam: float) -> Tensor:
        """OT_eps(P_c, P_c) for every class ``[C]`` (cached per diameter unless differentiable)."""
        if self._self_terms is not None and self._self_terms[0] == diam and not differentiable:
            return self._self_terms[1]
        pts = self.points - self.centre
        values = []
        for lo, hi in _chunks(self.n_classes, self.points.shape[1] ** 2):
            p, lw = pts[lo:hi], self.log_w[lo:hi]
            f = sinkhorn_self_potential(sqdist(p.detach(), p.detach()), lw, reg, opts, diam)
            # one last step from the detached potential; differentiating the cost's first argument
            # only gives the gradient of OT(P, P) / 2 (the cost is symmetric)
            f = softmin_rows(reg, sqdist(p, p.detach()) if differentiable else sqdist(p.detach(), p.detach()),
                             lw + f / reg)
            values.append(2 * masked_dot(lw, f))
        out = torch.cat(values)
        if not differentiable:
            self._self_terms = (diam, out)
        return out


#: Cost-matrix entries solved at once by the batched label pairs (and self-terms): bounds memory
#: at a few hundred MB in float32 (the solver holds the cost and one temporary of its size).
PAIR_BATCH_ENTRIES = 2 ** 25


def _chunks(n_items: int, entries_per_item: int):
    step = max(1, PAIR_BATCH_ENTRIES // max(1, entries_per_item))
    return [(lo, min(lo + step, n_items)) for lo in range(0, n_items, step)]


def label_distances_sinkhorn(c1: ClassClouds, c2: Optional[ClassClouds] = None, *, reg: float = 0.1,
                             opts: Optional[SinkhornOptions] = None, differentiable: bool = False) -> Tensor:
    """Debiased Sinkhorn divergences ``[C1, C2]`` between every class of ``c1`` and of ``c2``.

    S(P, Q) = OT_eps(P, Q) - OT_eps(P, P) / 2 - OT_eps(Q, Q) / 2 on the cost |x - x'|^2, which is
    microsoft/otdd's "exact" inner distance in ORCA's call. With ``c2 is None`` the set is compared
    with itself: only the upper triangle is solved and the diagonal is exactly 0.

    Args:
        c1, c2: class clouds of the two sets (``c2`` None = ``c1``).
        reg: entropic regularisation eps of every label pair (microsoft/otdd: 0.1).
        opts: solver settings.
        differentiable: carry gradients to both sets' features (envelope theorem: the optimal
            potentials are held fixed and one sweep is taken with autograd on).

    Returns:
        ``[C1, C2]`` tensor in the features' dtype and device.
    """
    opts = opts or SinkhornOptions()
    same = c2 is None
    c2 = c1 if same else c2
    # geomloss takes the diameter of each pair; one for all pairs of the call keeps them batched
    # (a pair's schedule then starts at most one step earlier, which only brings it closer to convergence).
    diam = diameter(c1.points.detach(), c2.points.detach())
    s1 = c1.self_terms(reg, opts, differentiable, diam)
    s2 = s1 if same else c2.self_terms(reg, opts, differentiable, diam)
    k1, k2 = c1.n_classes, c2.n_classes
    pairs = [(i, j) for i in range(k1) for j in range(i + 1 if same else 0, k2)]
    out = c1.points.new_zeros(k1, k2)
    if not pairs:
        return out
    centre = c1.centre
    p1, p2 = c1.points - centre, c2.points - centre
    values = []
    for lo, hi in _chunks(len(pairs), p1.shape[1] * p2.shape[1]):
        i = torch.tensor([p[0] for p in pairs[lo:hi]], device=p1.device)
        j = torch.tensor([p[1] for p in pairs[lo:hi]], device=p1.device)
        a, b, la, lb = p1[i], p2[j], c1.log_w[i], c2.log_w[j]
        f, g = sinkhorn_potentials(sqdist(a.detach(), b.detach()), la, lb, reg, opts, diam)
        # a last step of both potentials (geomloss' value); the gradient, if any, through f's alone (envelope theorem)
        cost = sqdist(a.detach(), b.detach())
        f, g = (softmin_rows(reg, sqdist(a, b) if differentiable else cost, lb + g / reg),
                softmin_cols(reg, cost, la + f / reg))
        values.append(masked_dot(la, f) + masked_dot(lb, g))
    ot = torch.cat(values)
    i = torch.tensor([p[0] for p in pairs], device=out.device)
    j = torch.tensor([p[1] for p in pairs], device=out.device)
    div = ot - 0.5 * s1[i] - 0.5 * s2[j]
    out = out.index_put((i, j), div)
    if same:
        out = out.index_put((j, i), div)
    return out


__all__ = ["ClassClouds", "INNER_METHODS", "PAIR_BATCH_ENTRIES", "label_distances_exact", "label_distances_gaussian",
           "label_distances_sinkhorn", "log_uniform", "pad_groups", "sqdist"]
