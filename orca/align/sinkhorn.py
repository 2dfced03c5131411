"""Batched log-domain Sinkhorn for entropic optimal transport: geomloss' fixed schedule, or to convergence.

For cost ``C [B, n, m]`` and weights ``a [B, n]``, ``b [B, m]`` (padding: log weight ``-inf``)
every problem of the batch is

    OT_eps(a, b) = min_P <P, C> + eps * KL(P | a x b)  =  max_{f, g} <a, f> + <b, g>  (at the optimum),

in geomloss' convention (the value is the transport cost plus the entropic term, not the cost alone).

Schedule ``"fixed"`` (the default): geomloss' eps-scaling (Feydy 2020, Algorithm 3.5), as
microsoft/otdd runs it, so the numbers are the ones it returns. With D the diameter of the point
clouds (the norm of their joint bounding box) and blur = sqrt(eps) (p = 2), the temperatures are
D^2, then D^2, D^2 s^2, D^2 s^4, ... while above eps (s = ``scaling`` = 0.5), then eps: about
log2(D / blur) + 2 of them, ~a dozen for stage-1 features. The first potentials are soft-min
transforms at D^2; at each temperature both potentials (and the self-problems' potentials) take one
*averaged* step x <- (x + T(x)) / 2; the callers take a last plain Sinkhorn step of both
potentials at eps with autograd on (geomloss' "extrapolation"), and the value <a, f> + <b, g> and
its gradient come from those. The loop does not run to convergence: the value sits a few tenths of a percent below the
converged one (bounded in the tests at 1 %), in exchange for a fixed, small cost per call.

Schedule ``"converged"``: eps-scaling (annealing; Schmitzer 2019): one sweep at each eps from the
largest cost down to the target eps, halving, so the final loop starts from a warm estimate. At the
target eps the iteration runs on (over-relaxed for the two-sided problem, averaged for the symmetric
self-problem, Feydy et al. 2019) until the *value* has converged, which it does long before the
marginals do: the dual value is stationary at the optimum, so it converges at twice the linear rate
of the potentials, and the float32 potentials of features with squared distances of 1e4 cannot
satisfy the marginals better than ~1e-3 at eps = 0.1 at all (one ulp of 1e4 is 1e-3, i.e. 1 % of
eps). Convergence test, every ``check_every`` sweeps: the change of the value since the last check
is below ``rtol`` relative (or at the floating-point noise floor of the potentials), and so is the
remaining error extrapolated from the last two changes (geometric tail). A problem that misses this
within ``max_iter`` sweeps triggers one RuntimeWarning naming the problem size, eps and the error.
The L1 marginal error is reported there too, but is not part of the test (see above).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor


#: Solver schedules (see the module doc).
SCHEDULES = ("fixed", "converged")


@dataclass
class SinkhornOptions:
    """Solver settings.

    Attributes:
        schedule: ``"fixed"`` (geomloss' annealing, microsoft/otdd's numbers) or ``"converged"``
            (anneal, then iterate until the value has converged to ``rtol``).
        scaling: ratio of successive blur = sqrt(eps) values of the fixed schedule (geomloss: 0.5).
        max_iter: sweeps at the target eps before giving up (a RuntimeWarning reports the error).
        rtol: relative change of the value (and extrapolated remaining error) that counts as converged.
        eps_decay: factor between successive eps of the annealing schedule.
        check_every: sweeps between convergence checks (each check syncs a GPU).
    """

    schedule: str = "fixed"
    scaling: float = 0.5
    max_iter: int = 2000
    rtol: float = 1e-4
    eps_decay: float = 0.5
    check_every: int = 5

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if not 0 < self.scaling < 1:
            raise ValueError(f"scaling={self.scaling} must be in (0, 1)")
        if self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter} must be >= 1")
        if not self.rtol > 0:
            raise ValueError(f"rtol={self.rtol} must be > 0")
        if not 0 < self.eps_decay < 1:
            raise ValueError(f"eps_decay={self.eps_decay} must be in (0, 1)")
        if self.check_every < 1:
            raise ValueError(f"check_every={self.check_every} must be >= 1")


# ----------------------------------------------------------------------------- c-transforms
def _logsumexp(z: Tensor, dim: int) -> Tensor:
    """logsumexp; on CPU without autograd, terms below e^-80 of the maximum are clamped first.

    Why: CPU exp takes a slow path for large negative arguments -- exponents down to -500, common
    at eps = 0.1, made every sweep ~10x slower. The clamped terms change the sum by at most
    n e^-80 relative. GPUs have no such slow path, and the autograd step uses the exact op.
    """
    if z.device.type != "cpu" or z.requires_grad:
        return torch.logsumexp(z, dim=dim)
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (z - m).clamp_min_(-80.0).exp_().sum(dim).log_().add_(m.squeeze(dim))


def softmin_rows(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps): the f-update (c-transform), ``h [B, m]`` -> ``[B, n]``."""
    return -eps * _logsumexp(h.unsqueeze(-2) - cost / eps, dim=-1)


def softmin_cols(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """The g-update: ``h [B, n]`` -> ``[B, m]``, reducing over the rows of ``cost``."""
    return -eps * _logsumexp(h.unsqueeze(-1) - cost / eps, dim=-2)


def masked_dot(log_w: Tensor, f: Tensor) -> Tensor:
    """sum_i w_i f_i per problem; padded entries (``log_w = -inf``) count exactly 0 whatever ``f`` holds."""
    return torch.where(torch.isfinite(log_w), log_w.exp() * f, torch.zeros_like(f)).sum(-1)


def eps_schedule(cost: Tensor, eps: float, decay: float) -> List[float]:
    """Annealing temperatures from the largest cost down to (not including) ``eps``."""
    top = float(cost.max()) if cost.numel() else 0.0
    sched, e = [], top
    while e > eps:
        sched.append(e)
        e *= decay
    return sched


def diameter(*clouds: Tensor) -> float:
    """geomloss' diameter estimate: the norm of the joint bounding box of point clouds ``[..., d]``."""
    pts = [c.reshape(-1, c.shape[-1]) for c in clouds]
    lo = torch.stack([p.min(0).values for p in pts]).min(0).values
    hi = torch.stack([p.max(0).values for p in pts]).max(0).values
    return float((hi - lo).norm())


def fixed_schedule(diam: float, eps: float, scaling: float = 0.5) -> List[float]:
    """geomloss' temperatures for p = 2: D^2, then (D s^k)^2 while blur = sqrt(eps) is not reached, then eps."""
    blur = math.sqrt(eps)
    diam = max(diam, 1e-12)
    return ([diam ** 2] + [float(np.exp(e)) for e in np.arange(2 * np.log(diam), 2 * np.log(blur),
                                                                2 * np.log(scaling))] + [eps])


@torch.no_grad()
def _fixed_potentials(cost: Tensor, log_a: Tensor, log_b: Tensor, schedule: List[float]) -> Tuple[Tensor, Tensor]:
    e = schedule[0]
    f, g = softmin_rows(e, cost, log_b), softmin_cols(e, cost, log_a)
    for e in schedule:
        f, g = 0.5 * (f + softmin_rows(e, cost, log_b + g / e)), 0.5 * (g + softmin_cols(e, cost, log_a + f / e))
    return f, g


@torch.no_grad()
def _fixed_self_potential(cost: Tensor, log_a: Tensor, schedule: List[float]) -> Tensor:
    f = softmin_rows(schedule[0], cost, log_a)
    for e in schedule:
        f = 0.5 * (f + softmin_rows(e, cost, log_a + f / e))
    return f


# ----------------------------------------------------------------------------- convergence
class _Monitor:
    """Tracks the per-problem value across checks and decides convergence (see the module doc)."""

    def __init__(self, cost: Tensor, eps: float, opts: SinkhornOptions):
        self.opts = opts
        self.eps = eps
        self.machine = torch.finfo(cost.dtype).eps
        self.prev = None
        self.prev_step = None
        self.err = math.inf
        self.moving = math.inf
        self.shape = tuple(cost.shape)

    def check(self, log_a: Tensor, f: Tensor, log_b: Tensor, g: Tensor, g_new: Tensor) -> bool:
        """Record a check of the dual pair (f, g_new), ``g_new`` the c-transform of f computed from
        ``g`` (symmetric problem: b = a, g = f); True once every problem has converged. The pair's
        value is <a, f> + <b, g_new>, and ``g``'s marginal error is the one reported."""
        value = masked_dot(log_a, f) + masked_dot(log_b, g_new)
        scale = masked_dot(log_a, f.abs()) + masked_dot(log_b, g_new.abs())
        return self.update(value, scale, _marginal_error(log_b, g, g_new, self.eps))

    def update(self, value: Tensor, scale: Tensor, err: float) -> bool:
        """Record a check; True once every problem has converged."""
        self.err = err
        value = value.double()
        if self.prev is None:
            self.prev = value
            return False
        step = (value - self.prev).abs()
        noise = 64 * self.machine * scale.double().abs()
        allowed = self.opts.rtol * value.abs() + noise
        if self.prev_step is None:
            tail = torch.full_like(step, math.inf)
        else:
            ratio = torch.where(self.prev_step > 0, step / self.prev_step, torch.ones_like(step))
            tail = torch.where(ratio < 1, step * ratio / (1 - ratio).clamp_min(1e-12), torch.full_like(step, math.inf))
            tail = torch.where(step <= noise, torch.zeros_like(tail), tail)
        rel = (torch.maximum(step, tail.clamp_max(1e300)) / value.abs().clamp_min(1e-300))
        self.moving = float(rel.max())
        self.prev, self.prev_step = value, step
        return bool(((step <= allowed) & (tail <= allowed)).all())

    def warn(self, kind: str, sweeps: int) -> None:
        b, n, m = self.shape
        warnings.warn(
            f"{kind} Sinkhorn did not converge: {b} problem(s) of {n} x {m} points at eps={self.eps:g} stopped "
            f"after {sweeps} sweeps with the value still moving by ~{self.moving:.1e} (relative; rtol "
            f"{self.opts.rtol:.0e}) and L1 marginal error {self.err:.1e}; "
            f"raise max_iter or eps", RuntimeWarning, stacklevel=4)


def _marginal_error(log_w: Tensor, h_old: Tensor, h_new: Tensor, eps: float) -> float:
    """L1 error of one marginal of the plan built on ``h_old`` (``h_new`` is its exact c-transform)."""
    mass = torch.exp(log_w + (h_old - h_new) / eps)
    return float(torch.where(torch.isfinite(log_w), (mass - log_w.exp()).abs(), torch.zeros_like(mass)).sum(-1).max())


# ----------------------------------------------------------------------------- solvers
@torch.no_grad()
def sinkhorn_potentials(cost: Tensor, log_a: Tensor, log_b: Tensor, eps: float,
                        opts: SinkhornOptions = SinkhornOptions(), diam: float = None) -> Tuple[Tensor, Tensor]:
    """Optimal dual potentials of a batch of entropic OT problems (log domain, eps-scaling).

    Args:
        cost: ``[B, n, m]`` ground costs.
        log_a: ``[B, n]`` log row weights (``-inf`` marks padding), each row summing to 1.
        log_b: ``[B, m]`` log column weights.
        eps: entropic regularisation.
        opts: solver settings.
        diam: the points' diameter (:func:`diameter`), which sets the fixed schedule.

    Returns:
        ``(f [B, n], g [B, m])``; the value is <a, T(g)> + <b, T(f)> (one more step of each).
    """
    if opts.schedule == "fixed":
        return _fixed_potentials(cost, log_a, log_b, fixed_schedule(diam, eps, opts.scaling))
    g = torch.zeros_like(log_b)
    for e in eps_schedule(cost, eps, opts.eps_decay):
        f = softmin_rows(e, cost, log_b + g / e)
        g = softmin_cols(e, cost, log_a + f / e)
    f = softmin_rows(eps, cost, log_b + g / eps)
    # Over-relaxed Sinkhorn (Thibault et al. 2017; Lehmann et al. 2021): x <- (1 - w) x + w T(x).
    # Plain sweeps (w = 1) converge linearly at a rate r close to 1 when eps << max C; w = 2 / (1 +
    # sqrt(1 - r)), Young's SOR optimum for the rate observed between checks, cuts the sweep count
    # several-fold. If the marginal error ever grows, w falls back to 1 for good.
    monitor = _Monitor(cost, eps, opts)
    omega, locked, prev_err = 1.0, False, None
    for it in range(1, opts.max_iter + 1):
        g_hat = softmin_cols(eps, cost, log_a + f / eps)
        if it % opts.check_every == 0:
            # (f, g_hat) has exact column sums and total mass 1: its dual value is OT_eps's lower bound.
            if monitor.check(log_a, f, log_b, g, g_hat):
                g = g_hat
                break
            err = monitor.err
            if prev_err is not None:
                if not math.isfinite(err) or err >= prev_err:
                    omega, locked = 1.0, True
                elif omega == 1.0 and not locked:
                    rate = (err / prev_err) ** (1.0 / opts.check_every)
                    omega = min(1.9, 2.0 / (1.0 + math.sqrt(max(1.0 - rate, 0.0))))
            prev_err = err
        g = g_hat if omega == 1.0 else (1 - omega) * g + omega * g_hat
        f_hat = softmin_rows(eps, cost, log_b + g / eps)
        f = f_hat if omega == 1.0 else (1 - omega) * f + omega * f_hat
    else:
        monitor.warn("two-sided", opts.max_iter)
    return softmin_rows(eps, cost, log_b + g / eps), g


@torch.no_grad()
def sinkhorn_self_potential(cost: Tensor, log_a: Tensor, eps: float,
                            opts: SinkhornOptions = SinkhornOptions(), diam: float = None) -> Tensor:
    """Symmetric potential of OT_eps(a, a) by the averaged fixed point f <- (f + T(f)) / 2.

    Why a separate solver: the symmetric problem has f = g, and averaging converges in a handful of
    sweeps where alternating updates oscillate (Feydy et al. 2019, Sec. 3).

    Args:
        cost: ``[B, n, n]`` symmetric costs.
        log_a: ``[B, n]`` log weights (``-inf`` for padding).
        eps: entropic regularisation.
        opts: solver settings.
        diam: the points' diameter (:func:`diameter`), which sets the fixed schedule.

    Returns:
        ``f [B, n]``; ``<a, T(f)>`` (one more step) is OT_eps(a, a) / 2.
    """
    if opts.schedule == "fixed":
        return _fixed_self_potential(cost, log_a, fixed_schedule(diam, eps, opts.scaling))
    sched = eps_schedule(cost, eps, opts.eps_decay)
    f = softmin_rows(sched[0] if sched else eps, cost, log_a)
    for e in sched[1:]:
        f = 0.5 * (f + softmin_rows(e, cost, log_a + f / e))
    monitor = _Monitor(cost, eps, opts)
    for it in range(1, opts.max_iter + 1):
        f_new = softmin_rows(eps, cost, log_a + f / eps)
        if it % opts.check_every == 0:
            if monitor.check(log_a, f, log_a, f, f_new):
                return 0.5 * (f + f_new)
        f = 0.5 * (f + f_new)
    monitor.warn("symmetric", opts.max_iter)
    return f


__all__ = ["SCHEDULES", "SinkhornOptions", "diameter", "eps_schedule", "fixed_schedule", "masked_dot",
           "sinkhorn_potentials", "sinkhorn_self_potential", "softmin_cols", "softmin_rows"]
