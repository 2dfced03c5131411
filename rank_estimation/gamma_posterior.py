"""The hypothesis's strength inferred, not assumed: a posterior over gamma in log D = log beta + gamma log(1 + knee).

Stage 2's IBP prior links a layer's gap to its rank through D = beta (1 + r)^gamma and, by default,
fixes gamma = 1. Across tasks the same law reads: a task's gap D and the rank it needs (its knee)
satisfy log D = log beta + gamma log(1 + knee) + noise. gamma > 0 is the hypothesis; gamma = 0 is
"the gap says nothing about the rank".

The model: log D_t = a + gamma x_t + e_t, x_t = log(1 + knee_t), e_t ~ N(0, sigma^2), with the
reference prior p(a, gamma, sigma) ~ 1 / sigma. Its marginal posterior of gamma is a Student t with
n - 2 degrees of freedom at the least-squares slope with scale s / sqrt(S_xx) (standard Bayesian
linear regression): exact, no sampler, no grid error.

Why average over bootstrap draws: a knee and a gap are estimates (seeds, images). Each draw
(knees resampled over seeds within each rank, gaps over images) gives one conditional posterior;
their average is the posterior that carries that measurement uncertainty (multiple imputation).
With a single draw it is the plain conditional posterior.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["gamma_posterior", "conditional_gamma"]


def conditional_gamma(gaps: Sequence[float], knees: Sequence[float]) -> Dict[str, float]:
    """The t posterior of gamma for one set of (gap, knee) pairs: ``loc``, ``scale``, ``df``, ``beta``.

    Raises:
        ValueError: fewer than 3 tasks, a gap <= 0, a negative knee, or knees all equal (gamma is
            then not identified).
    """
    d = np.asarray(gaps, dtype=np.float64)
    k = np.asarray(knees, dtype=np.float64)
    if d.ndim != 1 or d.shape != k.shape:
        raise ValueError(f"gamma posterior: gaps and knees must be 1-D of equal length, got {d.shape} and {k.shape}")
    if len(d) < 3:
        raise ValueError(f"gamma posterior needs >= 3 tasks (2 parameters and a noise scale), got {len(d)}")
    if not (np.isfinite(d).all() and (d > 0).all()):
        raise ValueError("gamma posterior: every gap must be finite and > 0 (log D)")
    if not (np.isfinite(k).all() and (k >= 0).all()):
        raise ValueError("gamma posterior: every knee must be finite and >= 0")
    x, y = np.log1p(k), np.log(d)
    sxx = float(((x - x.mean()) ** 2).sum())
    if sxx == 0:
        raise ValueError("gamma posterior: every task has the same knee, so gamma is not identified")
    g = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    a = float(y.mean() - g * x.mean())
    rss = float(((y - a - g * x) ** 2).sum())
    df = len(d) - 2
    s = math.sqrt(max(rss, 1e-300) / df)
    return {"loc": g, "scale": s / math.sqrt(sxx), "df": float(df), "beta": math.exp(a), "sigma": s}


def gamma_posterior(gap_draws: Sequence[Sequence[float]], knee_draws: Sequence[Sequence[float]],
                    level: float = 0.9, grid: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Posterior summary of gamma, averaged over paired draws of (gaps, knees).

    Args:
        gap_draws: ``[draws][tasks]`` gaps (draw 0 may be the point estimates).
        knee_draws: ``[draws][tasks]`` knees, paired with ``gap_draws``.
        level: coverage of the central credible interval.
        grid: gamma values at which the mixture CDF is solved (default: a fine grid around the draws).

    Returns:
        ``location`` (mean of the draws' posterior medians), ``p_positive`` (P(gamma > 0)), ``lo``, ``hi`` (central ``level`` interval), ``level``,
        ``draws`` (used), ``point`` (the conditional posterior of the first draw).
    """
    if len(gap_draws) != len(knee_draws) or not len(gap_draws):
        raise ValueError("gamma posterior: need the same (>= 1) number of gap and knee draws")
    if not 0 < level < 1:
        raise ValueError(f"gamma posterior: level={level!r} must be in (0, 1)")
    parts = [conditional_gamma(d, k) for d, k in zip(gap_draws, knee_draws)]
    locs = np.array([p["loc"] for p in parts])
    scales = np.array([p["scale"] for p in parts])
    dfs = np.array([p["df"] for p in parts])
    q = (1 - level) / 2
    if len(parts) == 1 and grid is None:  # one t distribution: its quantiles in closed form
        lo, hi = (float(stats.t.ppf(v, dfs[0], loc=locs[0], scale=scales[0])) for v in (q, 1 - q))
    else:
        if grid is None:
            width = float(np.max(scales)) * 60 + 1e-9
            grid = np.linspace(float(locs.min()) - width, float(locs.max()) + width, 20_001)
        cdf = np.mean([stats.t.cdf(grid, df, loc=m, scale=s) for m, s, df in zip(locs, scales, dfs)], axis=0)
        lo = float(np.interp(q, cdf, grid))
        hi = float(np.interp(1 - q, cdf, grid))
    p_pos = float(np.mean([stats.t.sf(0.0, df, loc=m, scale=s) for m, s, df in zip(locs, scales, dfs)]))
    return {"location": float(locs.mean()), "p_positive": p_pos, "lo": lo, "hi": hi, "level": level,
            "draws": len(parts), "point": parts[0]}
