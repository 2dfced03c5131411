"""Optimal transport dataset distance (OTDD; Alvarez-Melis & Fusi, NeurIPS 2020) for stages 1 and 2.

Definitions (paper Sec. 3). A labelled sample is z = (x, y). Each label y stands for its
class-conditional feature cloud P_y, and the ground cost between samples is (p = 2)

    d(z, z')^2 = ||x - x'||^2 + W_2^2(P_y, P'_y'),

where W_2^2 between two clouds is either *exact* (the optimal transport LP on the squared Euclidean
cost: an optimal assignment for equal class sizes, POT's network simplex otherwise, label pairs on a
thread pool) or the *Gaussian* (Bures-Wasserstein) closed form on the class means and covariances.
OTDD is the entropic OT value under this cost, in geomloss' convention

    OT_eps(a, b) = min_P <P, C> + eps * KL(P | a x b)    (= <a, f> + <b, g> at the optimum),

debiased into the Sinkhorn divergence S = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2
(Feydy et al., AISTATS 2019), which is exactly 0 for identical sets. Defaults are ORCA's:
exact inner OT, eps = 0.1, p = 2, debiased.

Why our own implementation rather than microsoft/otdd: ORCA's stage 1 calls otdd once per target
cluster per epoch (10 x 60 calls), and every call recomputes the 45 source-source label distances
and the source self-transport term, neither of which depends on the target. Here
:class:`OTDD` caches both for the source tensor it is given, solves all clusters as one batched
log-domain Sinkhorn problem on the features' device, and only the target-vs-source-class label
distances (the part that moves) are recomputed per call.

Gradients: w.r.t. the *target* features. The outer gradient comes from the envelope theorem, as
in geomloss: the Sinkhorn loop runs without autograd, and one last half-step from the detached
optimal potentials is taken with autograd on, so backward is one pass over the cost matrix instead
of one per iteration. By default that is all: the inner label distances are constants per step,
as in microsoft/otdd, which ORCA calls (it stores each label distance with ``.item()``). That is
not the full gradient -- moving a cluster also moves its distance to every source class, and on
small problems the two parts can even disagree in sign -- so ``inner_grad=True`` adds the label
term: for exact inner OT through sum_ij P_ij ||x_i - z_j||^2 with the optimal plans P held fixed
(the envelope theorem again), for the Gaussian one through the closed form. Source features never
receive a gradient.

Label rules (ValueError otherwise): the source needs >= 2 distinct labels, because with one label
the label term collapses to a constant and OTDD silently degenerates into feature-space OT -- in
practice that means unlabelled source features were passed with dummy labels (use an unlabelled
metric such as the ``sinkhorn`` gap or the ``mmd`` objective for those). The target may have a
single label: that is ORCA's use, where each k-means cluster is one single-label dataset.
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from orca.runs import usable_cpus

INNER_METHODS = ("exact", "gaussian")


# ----------------------------------------------------------------------------- input checks
def check_features(name: str, x, dim: Optional[int] = None, dim_name: Optional[str] = None) -> Tensor:
    """Return ``x`` as a float32/float64 tensor after checking shape and finiteness.

    Args:
        name: argument name used in error messages.
        x: features ``[n, d]`` (tensor or array).
        dim: expected ``d``, if known.
        dim_name: the argument ``dim`` came from, for the mismatch message.
    """
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a [n, d] tensor or array, got {type(x).__name__}") from err
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one [d>0]-dim sample")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # log-domain Sinkhorn at eps = 0.1 and kernel sums need at least float32
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/inf entries")
    if dim is not None and x.shape[1] != dim:
        other = f" of {dim_name}" if dim_name else ""
        raise ValueError(f"{name} has feature dimension {x.shape[1]} but the dimension{other} is {dim}")
    return x


def check_labels(name: str, labels, n: int, feats_name: str, device=None) -> Tensor:
    """Return ``labels`` as a ``long`` tensor of length ``n`` on ``device``.

    Args:
        name: argument name used in error messages.
        labels: class labels ``[n]`` (integers, or floats with integral values).
        n: number of feature rows they label.
        feats_name: the features' argument name, for the length-mismatch message.
        device: where the returned tensor lives.
    """
    if labels is None:
        raise ValueError(f"{name} is required (one label per row of {feats_name})")
    if not torch.is_tensor(labels):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} labels but {feats_name} has {n} rows")
    if labels.is_floating_point():
        if not torch.isfinite(labels).all() or (labels != labels.round()).any():
            raise ValueError(f"{name} must hold integer class labels (got non-integral floats)")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    return labels.long().to(device)


def _encode(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Map arbitrary integer labels to 0..C-1: ``(classes [C], index [n])``."""
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    return classes, index


# ----------------------------------------------------------------------------- inner label distances
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
    _, i1 = _encode(torch.as_tensor(y1).cpu())
    _, i2 = (None, i1) if same else _encode(torch.as_tensor(y2).cpu())
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
    _, i1 = _encode(torch.as_tensor(y1, device=x1.device))
    c1 = int(i1.max()) + 1
    mu1, a1 = _class_moments(x1, i1, c1, "labels of set 1")
    if same:
        mu2, a2, c2 = mu1, a1, c1
    else:
        x2 = (x2 if differentiable else x2.detach()).double().to(x1.device)
        _, i2 = _encode(torch.as_tensor(y2, device=x1.device))
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


def label_distances(x1, y1, x2=None, y2=None, *, inner: str = "exact", max_samples: Optional[int] = None,
                    seed: int = 0, differentiable: bool = False, threads: Optional[int] = None) -> Tensor:
    """Dispatch to :func:`label_distances_exact` or :func:`label_distances_gaussian`.

    Args:
        x1, y1, x2, y2: as in those functions.
        inner: ``"exact"`` or ``"gaussian"``.
        max_samples, seed: per-class subsample for the exact method.
        differentiable: keep gradients to the features (see the two functions).
        threads: worker threads of the exact method (None = one per usable CPU).
    """
    if inner == "exact":
        return label_distances_exact(x1, y1, x2, y2, max_samples=max_samples, seed=seed,
                                     differentiable=differentiable, threads=threads)
    if inner == "gaussian":
        return label_distances_gaussian(x1, y1, x2, y2, differentiable=differentiable)
    raise ValueError(f"inner={inner!r} is not one of {INNER_METHODS}")


# ----------------------------------------------------------------------------- batched log-domain Sinkhorn
def _sqdist(x: Tensor, y: Tensor) -> Tensor:
    """Squared distances ``[B, n, m]`` between ``x [B, n, d]`` and ``y [B or 1, m, d]``."""
    x2 = x.pow(2).sum(-1).unsqueeze(-1)
    y2 = y.pow(2).sum(-1).unsqueeze(-2)
    return (x2 + y2 - 2.0 * x @ y.transpose(-1, -2)).clamp_min(0)


def _logsumexp(z: Tensor, dim: int) -> Tensor:
    """logsumexp; on CPU without autograd, terms below e^-80 of the maximum are clamped first.

    Why: CPU exp takes a slow path for large negative arguments -- exponents down to -500, common
    at eps = 0.1, made every Sinkhorn sweep ~10x slower. The clamped terms change the sum by at
    most n e^-80 relative. GPUs have no such slow path, and the autograd step uses the exact op.
    """
    if z.device.type != "cpu" or z.requires_grad:
        return torch.logsumexp(z, dim=dim)
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (z - m).clamp_min_(-80.0).exp_().sum(dim).log_().add_(m.squeeze(dim))


def _softmin_rows(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps): the f-update (c-transform), ``h [B, m]`` -> ``[B, n]``."""
    return -eps * _logsumexp(h.unsqueeze(-2) - cost / eps, dim=-1)


def _softmin_cols(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """The g-update: ``h [B, n]`` -> ``[B, m]``, reducing over the rows of ``cost``."""
    return -eps * _logsumexp(h.unsqueeze(-1) - cost / eps, dim=-2)


def _eps_schedule(cost: Tensor, eps: float, decay: float) -> List[float]:
    """eps-scaling (Schmitzer 2019; geomloss): start at the squared diameter, shrink to ``eps``.

    Why: at the target eps the plain iteration needs O(max C / eps) sweeps; annealing gives a warm
    start at every scale, so the final loop only polishes.
    """
    top = float(cost.max())
    sched = []
    e = top
    while e > eps:
        sched.append(e)
        e *= decay
    return sched


@dataclass
class SinkhornOptions:
    """Outer-solver settings.

    Attributes:
        max_iter: sweeps at the final eps before giving up (a RuntimeWarning reports the error).
        tol: stop once every problem's L1 marginal violation is below this.
        eps_decay: factor between successive eps in the annealing schedule.
        check_every: sweeps between convergence checks (each check syncs the GPU).
    """

    max_iter: int = 2000
    tol: float = 1e-4
    eps_decay: float = 0.5
    check_every: int = 10

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter} must be >= 1")
        if not self.tol > 0:
            raise ValueError(f"tol={self.tol} must be > 0")
        if not 0 < self.eps_decay < 1:
            raise ValueError(f"eps_decay={self.eps_decay} must be in (0, 1)")
        if self.check_every < 1:
            raise ValueError(f"check_every={self.check_every} must be >= 1")


def _marginal_error(log_w: Tensor, f_old: Tensor, f_new: Tensor, eps: float) -> float:
    # Row sums of the current plan are w_i exp((f_old - f_new)_i / eps); padded rows have w = 0.
    rows = torch.exp(log_w + (f_old - f_new) / eps)
    return float((rows - log_w.exp()).abs().sum(-1).max())


@torch.no_grad()
def sinkhorn_potentials(cost: Tensor, log_a: Tensor, log_b: Tensor, eps: float,
                        opts: SinkhornOptions = SinkhornOptions()) -> Tuple[Tensor, Tensor]:
    """Optimal dual potentials of a batch of entropic OT problems (log domain, eps-scaling).

    Args:
        cost: ``[B, n, m]`` ground costs.
        log_a: ``[B, n]`` log source weights (``-inf`` marks padding), each row summing to 1.
        log_b: ``[B, m]`` log target weights.
        eps: entropic regularisation.
        opts: solver settings.

    Returns:
        ``(f [B, n], g [B, m])`` with ``f = c-transform(g)``, so ``<a, f> + <b, g>`` is OT_eps.
    """
    g = torch.zeros_like(log_b)
    for e in _eps_schedule(cost, eps, opts.eps_decay):
        f = _softmin_rows(e, cost, log_b + g / e)
        g = _softmin_cols(e, cost, log_a + f / e)
    f = _softmin_rows(eps, cost, log_b + g / eps)
    # Over-relaxed Sinkhorn (Thibault et al. 2017; Lehmann et al. 2021): x <- (1 - w) x + w T(x).
    # Plain sweeps (w = 1) converge linearly at a rate r close to 1 when eps << max C (r ~ 0.98
    # per sweep at ORCA's eps = 0.1); w = 2 / (1 + sqrt(1 - r)), Young's SOR optimum estimated from
    # the observed rate, cuts the sweep count ~5-10x. If the error ever grows, w falls back to 1.
    omega, locked, prev = 1.0, False, None
    err = math.inf
    for it in range(1, opts.max_iter + 1):
        g = (1 - omega) * g + omega * _softmin_cols(eps, cost, log_a + f / eps)
        f_hat = _softmin_rows(eps, cost, log_b + g / eps)
        if it % opts.check_every == 0 or it == opts.max_iter:
            g_hat = _softmin_cols(eps, cost, log_a + f / eps)
            err = max(_marginal_error(log_a, f, f_hat, eps), _marginal_error(log_b, g, g_hat, eps))
            if err < opts.tol:
                f = f_hat
                break
            if prev is not None:
                if not math.isfinite(err) or err >= prev:
                    omega, locked = 1.0, True
                elif omega == 1.0 and not locked:
                    rate = (err / prev) ** (1.0 / opts.check_every)
                    omega = min(1.9, 2.0 / (1.0 + math.sqrt(max(1.0 - rate, 0.0))))
            prev = err
        f = (1 - omega) * f + omega * f_hat
    else:
        warnings.warn(f"Sinkhorn stopped after {opts.max_iter} sweeps with marginal error {err:.2e} "
                      f"> tol {opts.tol:.1e}; raise max_iter or eps", RuntimeWarning, stacklevel=3)
        f = _softmin_rows(eps, cost, log_b + g / eps)
    return f, g


@torch.no_grad()
def sinkhorn_self_potential(cost: Tensor, log_a: Tensor, eps: float,
                            opts: SinkhornOptions = SinkhornOptions()) -> Tensor:
    """Symmetric potential of OT_eps(a, a) by the averaged fixed point f <- (f + T(f)) / 2.

    Why a separate solver: the symmetric problem has f = g, and averaging converges in a handful of
    sweeps where alternating updates oscillate (Feydy et al. 2019, Sec. 3).

    Args:
        cost: ``[B, n, n]`` symmetric costs.
        log_a: ``[B, n]`` log weights (``-inf`` for padding).
        eps: entropic regularisation.
        opts: solver settings.

    Returns:
        ``f [B, n]``; ``<a, f>`` equals OT_eps(a, a) / 2.
    """
    sched = _eps_schedule(cost, eps, opts.eps_decay)
    f = _softmin_rows(sched[0] if sched else eps, cost, log_a)
    for e in sched[1:]:
        f = 0.5 * (f + _softmin_rows(e, cost, log_a + f / e))
    err = math.inf
    for it in range(1, opts.max_iter + 1):
        f_new = _softmin_rows(eps, cost, log_a + f / eps)
        if it % opts.check_every == 0 or it == opts.max_iter:
            err = _marginal_error(log_a, f, f_new, eps)
        f = 0.5 * (f + f_new)
        if err < opts.tol:
            break
    else:
        warnings.warn(f"symmetric Sinkhorn stopped after {opts.max_iter} sweeps with marginal error "
                      f"{err:.2e} > tol {opts.tol:.1e}", RuntimeWarning, stacklevel=3)
    return f


def _masked_dot(log_w: Tensor, f: Tensor) -> Tensor:
    # where(), not w * f: padded entries may hold any finite f, and their weight must be exactly 0.
    return torch.where(torch.isfinite(log_w), log_w.exp() * f, torch.zeros_like(f)).sum(-1)


# ----------------------------------------------------------------------------- OTDD
def _pad_groups(index: Tensor, n_groups: int) -> Tuple[Tensor, Tensor]:
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


def _log_uniform(mask: Tensor, dtype) -> Tensor:
    counts = mask.sum(-1, keepdim=True).to(dtype)
    return torch.where(mask, -counts.log(), torch.full_like(counts, -math.inf).expand_as(mask))


class OTDD:
    """OTDD with source-side caching and batched per-cluster evaluation.

    Why a class: the source set is fixed across a whole stage-1 run, so its label-to-label distances
    and its debiasing self-term are computed once and kept while the *same* source tensors (same
    objects, not modified in place) are passed again.

    Args:
        inner: ``"exact"`` (exact OT per label pair on CPU) or ``"gaussian"`` (Bures closed form).
        reg: entropic regularisation eps of the outer problem (ORCA/otdd: 0.1).
        debiased: return the Sinkhorn divergence instead of OT_eps(a, b).
        inner_max_samples: cap on points per class in exact inner OT (None = all).
        seed: seed of that subsample.
        sinkhorn: outer-solver settings.
        inner_grad: also differentiate the target-vs-source label distances (exact: through the
            fixed optimal plans; gaussian: through the closed form). False is ORCA/otdd's behaviour.
        inner_threads: worker threads for the exact label pairs (None = one per CPU this process
            may use; 1 = serial). Values do not depend on it.
    """

    def __init__(self, inner: str = "exact", reg: float = 0.1, debiased: bool = True,
                 inner_max_samples: Optional[int] = None, seed: int = 0,
                 sinkhorn: Optional[SinkhornOptions] = None, inner_grad: bool = False,
                 inner_threads: Optional[int] = None):
        if inner not in INNER_METHODS:
            raise ValueError(f"inner={inner!r} is not one of {INNER_METHODS}")
        if not reg > 0:
            raise ValueError(f"reg={reg} must be > 0")
        if inner_max_samples is not None and inner_max_samples < 1:
            raise ValueError(f"inner_max_samples={inner_max_samples} must be >= 1 or None")
        if inner_threads is not None and inner_threads < 1:
            raise ValueError(f"inner_threads={inner_threads} must be >= 1 or None")
        self.inner = inner
        self.reg = float(reg)
        self.debiased = debiased
        self.inner_max_samples = inner_max_samples
        self.seed = seed
        self.opts = sinkhorn or SinkhornOptions()
        self.inner_grad = inner_grad
        self.inner_threads = inner_threads
        self._cache: Dict[str, object] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _inner(self, x1, y1, x2=None, y2=None) -> Tensor:
        grad = self.inner_grad and torch.is_grad_enabled() and x1.requires_grad
        return label_distances(x1, y1, x2, y2, inner=self.inner, max_samples=self.inner_max_samples,
                               seed=self.seed, differentiable=grad, threads=self.inner_threads)

    def _check(self, target_feats, target_labels, source_feats, source_labels):
        source_feats = check_features("source_feats", source_feats)
        target_feats = check_features("target_feats", target_feats, source_feats.shape[1], "source_feats")
        source_labels = check_labels("source_labels", source_labels, source_feats.shape[0], "source_feats",
                                     source_feats.device)
        target_labels = check_labels("target_labels", target_labels, target_feats.shape[0], "target_feats",
                                     target_feats.device)
        n_src_classes = int(torch.unique(source_labels).numel())
        if n_src_classes < 2:
            raise ValueError(
                f"source_labels has a single distinct label ({int(source_labels[0])}); OTDD needs a "
                "labelled source with >= 2 classes (with one, the label term is a constant and OTDD is "
                "plain feature OT). For unlabelled sources use the 'sinkhorn' gap metric or the 'mmd' "
                "objective.")
        return target_feats, target_labels, source_feats, source_labels

    def _source_state(self, source_feats: Tensor, source_labels: Tensor, dtype, device):
        """Source label distances and the debiasing self-term, cached per source tensor identity."""
        c = self._cache
        # Identity + in-place version for the features (comparing 5000 x d values per call would
        # cost as much as a Sinkhorn sweep); labels are small, so they are compared by value.
        hit = (c.get("feats") is source_feats and c.get("version") == source_feats._version
               and c.get("dtype") == dtype and c.get("device") == device
               and torch.equal(c["labels"], source_labels))
        if not hit:
            xs = source_feats.detach().to(device=device, dtype=dtype)
            _, ys = _encode(source_labels.to(device))
            w_ss = self._inner(xs, ys).to(device=device, dtype=dtype)
            centre = xs.mean(0)
            xs_c = (xs - centre).unsqueeze(0)
            self_half = None
            if self.debiased:
                cost = _sqdist(xs_c, xs_c) + w_ss[ys][:, ys]
                log_b = torch.full((1, xs.shape[0]), -math.log(xs.shape[0]), dtype=dtype, device=device)
                fb = sinkhorn_self_potential(cost, log_b, self.reg, self.opts)
                self_half = _masked_dot(log_b, fb)[0]
                del cost
            c.clear()
            c.update(feats=source_feats, labels=source_labels.clone(), version=source_feats._version,
                     dtype=dtype, device=device,
                     xs=xs, xs_c=xs_c, centre=centre, ys=ys, w_ss=w_ss, self_half=self_half)
        return c

    def _solve(self, xt: Tensor, log_a: Tensor, yt: Tensor, w_ts: Tensor, w_tt: Tensor, src) -> Tensor:
        """Per-problem OTDD values ``[B]`` for padded target batches ``xt [B, n, d]`` vs the source.

        ``yt [B, n]`` indexes rows of ``w_ts [Ct, Cs]`` / ``w_tt [Ct, Ct]``.
        """
        eps = self.reg
        xs_c, ys = src["xs_c"], src["ys"]
        xt_c = xt - src["centre"]  # centring: no float32 cancellation in ||x||^2 + ||y||^2 - 2xy
        m = xs_c.shape[1]
        log_b = torch.full((xt.shape[0], m), -math.log(m), dtype=xt.dtype, device=xt.device)
        label_ts = w_ts[yt.unsqueeze(-1), ys.view(1, 1, -1)]  # [B, n, m]
        with torch.no_grad():
            cost = _sqdist(xt_c.detach(), xs_c) + label_ts.detach()
            f, g = sinkhorn_potentials(cost, log_a, log_b, eps, self.opts)
            del cost
        # Envelope theorem: one differentiable half-step from the detached optimum (see module doc).
        cost = _sqdist(xt_c, xs_c) + label_ts
        f = _softmin_rows(eps, cost, log_b + g / eps)
        value = _masked_dot(log_a, f) + _masked_dot(log_b, g)
        del cost
        if not self.debiased:
            return value
        label_tt = w_tt[yt.unsqueeze(-1), yt.unsqueeze(-2)]
        with torch.no_grad():
            cost = _sqdist(xt_c.detach(), xt_c.detach()) + label_tt.detach()
            fa = sinkhorn_self_potential(cost, log_a, eps, self.opts)
            del cost
        # The half-step differentiates only the first argument of C(x, x'), i.e. half of the
        # symmetric gradient -- exactly d[OT(a,a)/2]. The label term depends on x as a whole, so
        # half of its gradient is taken explicitly (value unchanged).
        cost = _sqdist(xt_c, xt_c.detach()) + 0.5 * (label_tt + label_tt.detach())
        fa = _softmin_rows(eps, cost, log_a + fa / eps)
        return value - _masked_dot(log_a, fa) - src["self_half"]

    # -- public --------------------------------------------------------------------------------
    def distance(self, target_feats, target_labels, source_feats, source_labels) -> Tensor:
        """OTDD between a labelled target set and the labelled source set.

        Args:
            target_feats: ``[n, d]`` (may require grad).
            target_labels: ``[n]`` integer labels (one distinct label is allowed).
            source_feats: ``[m, d]``.
            source_labels: ``[m]`` integer labels, >= 2 distinct.

        Returns:
            0-dim tensor on ``target_feats``' device, differentiable w.r.t. ``target_feats``.
        """
        xt, lt, xs, ls = self._check(target_feats, target_labels, source_feats, source_labels)
        src = self._source_state(xs, ls, xt.dtype, xt.device)
        _, yt = _encode(lt)
        w_ts = self._inner(xt, yt, src["xs"], src["ys"]).to(device=xt.device, dtype=xt.dtype)
        w_tt = self._inner(xt, yt).to(device=xt.device, dtype=xt.dtype)
        log_a = torch.full((1, xt.shape[0]), -math.log(xt.shape[0]), dtype=xt.dtype, device=xt.device)
        return self._solve(xt.unsqueeze(0), log_a, yt.unsqueeze(0), w_ts, w_tt, src)[0]

    def per_cluster(self, target_feats, clusters, source_feats, source_labels) -> Tuple[Tensor, Tensor]:
        """OTDD of every target cluster, each as a single-label set, against the source (ORCA stage 1).

        Equivalent to ``distance(target_feats[clusters == k], zeros, source...)`` for each cluster k,
        but solved as one padded batch sharing the cached source terms.

        Args:
            target_feats: ``[n, d]`` (may require grad).
            clusters: ``[n]`` integer cluster ids (e.g. k-means on the targets).
            source_feats: ``[m, d]``.
            source_labels: ``[m]`` integer labels, >= 2 distinct.

        Returns:
            ``(values [K], cluster_ids [K])``, clusters in sorted id order.
        """
        xt, lt, xs, ls = self._check(target_feats, clusters, source_feats, source_labels)
        src = self._source_state(xs, ls, xt.dtype, xt.device)
        ids, index = _encode(lt)
        k = ids.numel()
        # Each cluster is its own label, so W(cluster_k, source class c) is the only inner term;
        # within a cluster the label cost is W(k, k) = 0.
        w_ts = self._inner(xt, index, src["xs"], src["ys"]).to(device=xt.device, dtype=xt.dtype)
        w_tt = torch.zeros(k, k, dtype=xt.dtype, device=xt.device)
        rows, mask = _pad_groups(index, k)
        yt = torch.arange(k, device=xt.device).unsqueeze(1).expand_as(rows)
        values = self._solve(xt[rows], _log_uniform(mask, xt.dtype), yt, w_ts, w_tt, src)
        return values, ids


def otdd(target_feats, target_labels, source_feats, source_labels, *, inner: str = "exact", reg: float = 0.1,
         debiased: bool = True, inner_max_samples: Optional[int] = None, seed: int = 0,
         sinkhorn: Optional[SinkhornOptions] = None, inner_grad: bool = False,
         inner_threads: Optional[int] = None) -> Tensor:
    """OTDD between two labelled feature sets (one-off; use :class:`OTDD` to reuse source caches).

    Args:
        target_feats: ``[n, d]``, differentiable input.
        target_labels: ``[n]`` integer labels.
        source_feats: ``[m, d]``.
        source_labels: ``[m]`` integer labels with >= 2 distinct values.
        inner, reg, debiased, inner_max_samples, seed, sinkhorn, inner_grad, inner_threads: see :class:`OTDD`.

    Returns:
        0-dim tensor.
    """
    return OTDD(inner=inner, reg=reg, debiased=debiased, inner_max_samples=inner_max_samples, seed=seed,
                sinkhorn=sinkhorn, inner_grad=inner_grad, inner_threads=inner_threads,
                ).distance(target_feats, target_labels, source_feats, source_labels)


# ----------------------------------------------------------------------------- plain reference
def _entropic_ot_value(a, b, cost, reg: float, num_iter_max: int, stop_thr: float) -> float:
    """OT_eps from POT's log-domain plan: <P, C> + eps KL(P | a x b), the same quantity as ours."""
    import ot

    plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=num_iter_max, stopThr=stop_thr)
    if torch.is_tensor(plan):
        ab = a[:, None] * b[None, :]
        kl = torch.special.xlogy(plan, plan).sum() - torch.special.xlogy(plan, ab).sum() - plan.sum() + ab.sum()
        return float((plan * cost).sum() + reg * kl)
    ab = np.outer(a, b)
    from scipy.special import xlogy

    kl = xlogy(plan, plan).sum() - xlogy(plan, ab).sum() - plan.sum() + ab.sum()
    return float((plan * cost).sum() + reg * kl)


def otdd_reference(target_feats, target_labels, source_feats, source_labels, *, reg: float = 0.1,
                   debiased: bool = True, num_iter_max: int = 100000, stop_thr: float = 1e-7,
                   device: Optional[str] = "cpu") -> float:
    """Plain OTDD for tests and benchmarks: POT emd for every label pair, then POT Sinkhorn.

    Nothing is cached or batched -- every call recomputes all label distances and all three
    transport terms -- which is how ORCA's per-cluster calls to microsoft/otdd behave.

    Args:
        target_feats: ``[n, d]``.
        target_labels: ``[n]``.
        source_feats: ``[m, d]``.
        source_labels: ``[m]``.
        reg: entropic regularisation eps.
        debiased: subtract the two self-terms.
        num_iter_max, stop_thr: POT ``sinkhorn_log`` settings. The plain alternating iteration
            oscillates on the symmetric self-terms, so 1e-9 can take 5e4 sweeps; 1e-7 already
            fixes the value to ~1e-7 relative.
        device: torch device for POT's Sinkhorn (float64; POT's torch backend is ~5x faster than
            its numpy one on CPU), or None for numpy. Label distances are always numpy on CPU.

    Returns:
        The OTDD value as a float.
    """
    import ot

    xt = check_features("target_feats", target_feats)
    xs = check_features("source_feats", source_feats, xt.shape[1], "target_feats")
    lt = check_labels("target_labels", target_labels, xt.shape[0], "target_feats")
    ls = check_labels("source_labels", source_labels, xs.shape[0], "source_feats")
    xt = xt.detach().cpu().double().numpy()
    xs = xs.detach().cpu().double().numpy()
    _, it = _encode(lt)
    _, is_ = _encode(ls)
    it, is_ = it.numpy(), is_.numpy()
    ct, cs = it.max() + 1, is_.max() + 1
    clouds_t = [xt[it == c] for c in range(ct)]
    clouds_s = [xs[is_ == c] for c in range(cs)]

    def pairwise(c1, c2):
        return np.array([[_emd_uniform(u, v) for v in c2] for u in c1])

    def outer(x1, i1, x2, i2, w):
        cost = ot.dist(x1, x2, metric="sqeuclidean") + w[i1][:, i2]
        a = np.full(x1.shape[0], 1.0 / x1.shape[0])
        b = np.full(x2.shape[0], 1.0 / x2.shape[0])
        if device is not None:
            a, b, cost = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in (a, b, cost))
        return _entropic_ot_value(a, b, cost, reg, num_iter_max, stop_thr)

    value = outer(xt, it, xs, is_, pairwise(clouds_t, clouds_s))
    if debiased:
        value -= 0.5 * outer(xt, it, xt, it, pairwise(clouds_t, clouds_t))
        value -= 0.5 * outer(xs, is_, xs, is_, pairwise(clouds_s, clouds_s))
    return value


__all__ = [
    "INNER_METHODS", "OTDD", "SinkhornOptions", "check_features", "check_labels", "label_distances",
    "label_distances_exact", "label_distances_gaussian", "otdd", "otdd_reference", "sinkhorn_potentials",
    "sinkhorn_self_potential",
]
