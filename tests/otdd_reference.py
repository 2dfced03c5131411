"""Test oracles for orca.align.otdd, written plainly from the algorithms they check (tests only).

* :func:`microsoft_otdd` follows microsoft/otdd's algorithm for ORCA's call step by step with
  geomloss, as microsoft/otdd does: every label pair's distance is geomloss' debiased Sinkhorn
  divergence on the full squared distance at blur sqrt(0.1) (its "exact" inner method), one pair at a
  time; samples become (x, label) rows with the target's labels numbered after the source's; the
  outer problem is geomloss' debiased ``SamplesLoss`` at blur sqrt(0.1) on the tensorized backend with
  cost |x - x'|^2 / 2 + W / 2. Its gradient flows to the target features through geomloss' last
  extrapolation step, with the label distances as constants.
* :func:`converged_otdd` is the same quantity with every entropic OT term solved in float64 to a tight
  tolerance, to measure how far a solver is from convergence (geomloss' fixed schedule included):
  OT_eps(a, b) by POT's log-domain Sinkhorn; a self term OT_eps(a, a) by the symmetric log-domain
  fixed point f <- (f + T f) / 2 (Feydy et al. 2019), the same optimum, reached in tens of
  iterations where alternating Sinkhorn takes tens of thousands on well-separated classes (and
  stops at its iteration cap short of 1e-11).
* :func:`paper_otdd` is the paper's definition (cost |x - x'|^2 + W_2^2 with the exact LP per label
  pair), POT's network simplex and Sinkhorn in float64.
"""
from __future__ import annotations

from typing import Callable, List

import numpy as np
import ot
import torch
from geomloss import SamplesLoss
from scipy.special import logsumexp, xlogy


def _classes(x: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
    return [x[y == c] for c in torch.unique(y, sorted=True)]


def _pairwise(c1, c2, same: bool, fn: Callable) -> torch.Tensor:
    out = torch.zeros(len(c1), len(c2), dtype=torch.float64)
    for i, u in enumerate(c1):
        for j, v in enumerate(c2):
            if same and j <= i:
                out[i, j] = out[j, i] if j < i else 0.0
                continue
            out[i, j] = fn(u, v)
    return out


def _sqdist(x, y):
    return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)


def microsoft_otdd(xt: torch.Tensor, yt: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                   eps: float = 0.1, inner_eps: float = 0.1) -> torch.Tensor:
    """microsoft/otdd's value for ORCA's call, differentiable w.r.t. ``xt``."""
    inner = SamplesLoss("sinkhorn", p=2, blur=inner_eps ** 0.5, debias=True, cost=_sqdist)

    def w(u, v):
        return float(inner(u.detach(), v.detach()))

    cs, ct = _classes(xs, ys), _classes(xt, yt)
    w_ss = _pairwise(cs, cs, True, w)
    w_st = _pairwise(cs, ct, False, w)
    w_tt = _pairwise(ct, ct, True, w)
    big = torch.cat([torch.cat([w_ss, w_st], 1), torch.cat([w_st.T, w_tt], 1)], 0).to(xs.dtype)
    _, is_ = torch.unique(ys, sorted=True, return_inverse=True)
    _, it = torch.unique(yt, sorted=True, return_inverse=True)
    z1 = torch.cat([xs, (is_ + 0).to(xs.dtype).unsqueeze(1)], 1)
    z2 = torch.cat([xt, (it + len(cs)).to(xt.dtype).unsqueeze(1)], 1)

    def cost(a, b):
        la, lb = a[..., -1].long(), b[..., -1].long()
        return _sqdist(a[..., :-1], b[..., :-1]) / 2 + big[la.unsqueeze(-1), lb.unsqueeze(-2)] / 2

    outer = SamplesLoss("sinkhorn", p=2, blur=eps ** 0.5, debias=True, cost=cost, backend="tensorized")
    return outer(z1, z2)


#: marginal error (2-norm) at which every entropic OT term counts as solved
STOP = 1e-11


def _plan_value(plan: np.ndarray, cost: np.ndarray, eps: float) -> float:
    """<P, C> + eps KL(P | a x b) for uniform weights a, b."""
    ab = np.outer(np.full(cost.shape[0], 1.0 / cost.shape[0]), np.full(cost.shape[1], 1.0 / cost.shape[1]))
    kl = xlogy(plan, plan).sum() - xlogy(plan, ab).sum() - plan.sum() + ab.sum()
    return float((plan * cost).sum() + eps * kl)


def _entropic_ot(cost: np.ndarray, eps: float) -> float:
    """OT_eps between uniform weights, POT log-domain Sinkhorn, tight."""
    a = np.full(cost.shape[0], 1.0 / cost.shape[0])
    b = np.full(cost.shape[1], 1.0 / cost.shape[1])
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=200000, stopThr=STOP)
    return _plan_value(plan, cost, eps)


def _entropic_ot_self(cost: np.ndarray, eps: float, max_iter: int = 10000) -> float:
    """OT_eps(a, a) for a symmetric cost and uniform a: the symmetric potential f = g is the fixed
    point of the averaged log-domain update, run until the plan's marginal is within :data:`STOP`."""
    cost = 0.5 * (cost + cost.T)  # symmetric up to rounding already; exactly, for the fixed point
    log_a = np.full(cost.shape[0], -np.log(cost.shape[0]))
    f = np.zeros(cost.shape[0])
    for _ in range(max_iter):
        f = 0.5 * (f - eps * logsumexp(log_a + (f - cost) / eps, axis=1))
        plan = np.exp((f[:, None] + f[None, :] - cost) / eps + log_a[:, None] + log_a[None, :])
        if np.linalg.norm(plan.sum(0) - np.exp(log_a)) < STOP:
            return _plan_value(plan, cost, eps)
    raise RuntimeError(f"symmetric Sinkhorn did not reach {STOP} in {max_iter} iterations")


def _divergence(x1, x2, cost_fn, eps) -> float:
    return (_entropic_ot(cost_fn(x1, x2), eps) - 0.5 * _entropic_ot_self(cost_fn(x1, x1), eps)
            - 0.5 * _entropic_ot_self(cost_fn(x2, x2), eps))


def _numpy_sets(xt, yt, xs, ys):
    xt, xs = (t.detach().double().cpu().numpy() for t in (xt, xs))
    _, it = torch.unique(yt.cpu(), sorted=True, return_inverse=True)
    _, is_ = torch.unique(ys.cpu(), sorted=True, return_inverse=True)
    return xt, it.numpy(), xs, is_.numpy()


def _outer(xt, it, xs, is_, w_ss, w_st, w_tt, scale: float, eps: float) -> float:
    def cost(x1, i1, x2, i2, w):
        return scale * (ot.dist(x1, x2, metric="sqeuclidean") + w[i1][:, i2])

    return (_entropic_ot(cost(xt, it, xs, is_, w_st.T), eps)
            - 0.5 * _entropic_ot_self(cost(xt, it, xt, it, w_tt), eps)
            - 0.5 * _entropic_ot_self(cost(xs, is_, xs, is_, w_ss), eps))


def converged_otdd(xt, yt, xs, ys, eps: float = 0.1, inner_eps: float = 0.1) -> float:
    """microsoft/otdd's quantity for ORCA's call with every OT term converged (float64)."""
    xt, it, xs, is_ = _numpy_sets(xt, yt, xs, ys)
    cs = [xs[is_ == c] for c in range(is_.max() + 1)]
    ct = [xt[it == c] for c in range(it.max() + 1)]

    def w(u, v):
        return _divergence(u, v, lambda p, q: ot.dist(p, q, metric="sqeuclidean"), inner_eps)

    w_ss, w_st, w_tt = (_pairwise(a, b, same, w).numpy() for a, b, same in ((cs, cs, True), (cs, ct, False),
                                                                           (ct, ct, True)))
    return _outer(xt, it, xs, is_, w_ss, w_st, w_tt, 0.5, eps)


def paper_otdd(xt, yt, xs, ys, eps: float = 0.1) -> float:
    """The paper's OTDD: cost |x - x'|^2 + W_2^2 (exact LP per label pair), debiased, float64."""
    xt, it, xs, is_ = _numpy_sets(xt, yt, xs, ys)
    cs = [xs[is_ == c] for c in range(is_.max() + 1)]
    ct = [xt[it == c] for c in range(it.max() + 1)]

    def w(u, v):
        cost = ot.dist(u, v, metric="sqeuclidean")
        return float(ot.emd2(np.full(len(u), 1 / len(u)), np.full(len(v), 1 / len(v)), cost, numItermax=10 ** 7))

    w_ss, w_st, w_tt = (_pairwise(a, b, same, w).numpy() for a, b, same in ((cs, cs, True), (cs, ct, False),
                                                                           (ct, ct, True)))
    return _outer(xt, it, xs, is_, w_ss, w_st, w_tt, 1.0, eps)


__all__ = ["converged_otdd", "microsoft_otdd", "paper_otdd"]
