"""Statistics for the seed's hypothesis: "the LoRA rank a task needs grows with its modality gap".

Pure functions (numpy / scipy, no torch import at module level), used by ``scripts/hypothesis.py``:

- :func:`knee_rank`, :func:`bootstrap_knee`: the smallest rank whose error is within a tolerance of
  the best rank's, and its bootstrap interval over seeds;
- :func:`spearman_with_ci`, :func:`permutation_pvalue`: rank correlation with a bootstrap interval
  over pairs and an exact (small n) or Monte-Carlo permutation p-value;
- how low-rank a full fine-tuning update Delta W = W_ft - W_0 is lives in ``orca.spectra`` (stage 3
  writes the spectra it reads);
- :func:`budget_matched`: runs of different methods grouped by equal adapter-parameter budgets;
- :func:`verdict`: one rule, stated once, that turns an interval and a p-value into
  "held" / "failed" / "inconclusive (reason: ...)".

Why Spearman and not Pearson: the hypothesis is monotone ("grows with"), gaps of different tasks
live on a metric-dependent scale, and knee ranks are powers of two; only the order is meaningful.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "knee_rank", "bootstrap_knee", "spearman", "spearman_with_ci", "permutation_pvalue", "EXACT_MAX_N",
    "budget_matched", "mean_difference_ci",
    "verdict", "knee_order_verdict", "combine_verdicts",
]


# ----------------------------------------------------------------------------- input checks
def _pairs(x: Sequence[float], y: Sequence[float], what: str = "correlation") -> tuple:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{what}: x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"{what} needs at least 3 points (e.g. 3 tasks), got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: x and y must be finite (no NaN / inf)")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError(f"{what}: x or y is constant, so no rank correlation is defined")
    return x, y


def _curve(ranks: Sequence[int], errors_by_seed: Sequence[Sequence[float]]) -> tuple:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError("knee_rank: ranks must be a non-empty 1-D sequence")
    if len(errors_by_seed) != len(ranks):
        raise ValueError(f"knee_rank: {len(ranks)} ranks but errors for {len(errors_by_seed)}")
    if len(set(ranks.tolist())) != len(ranks):
        raise ValueError(f"knee_rank: ranks must be distinct, got {ranks.tolist()}")
    errs = []
    for r, e in zip(ranks.tolist(), errors_by_seed):
        e = np.atleast_1d(np.asarray(e, dtype=np.float64))
        if e.size == 0:
            raise ValueError(f"knee_rank: rank {r} has no error values")
        if not np.isfinite(e).all():
            raise ValueError(f"knee_rank: rank {r} has a non-finite error {e.tolist()}")
        errs.append(e)
    order = np.argsort(ranks, kind="stable")
    return ranks[order], [errs[i] for i in order]


# ----------------------------------------------------------------------------- (a) knee rank
def _knee_from_means(ranks: np.ndarray, means: np.ndarray, tol: float, rel: bool) -> int:
    best = float(means.min())
    limit = best * (1.0 + tol) if rel else best + tol
    # A float tolerance of 1e-12 keeps the best rank itself always inside its own limit.
    return int(ranks[np.nonzero(means <= limit + 1e-12 * max(abs(limit), 1.0))[0][0]])


def knee_rank(ranks: Sequence[int], errors_by_seed: Sequence[Sequence[float]], tol: float = 0.05,
              rel: bool = True) -> int:
    """The smallest rank whose seed-mean error is within ``tol`` of the best rank's.

    Args:
        ranks: the swept ranks (any order, distinct; 0 = head only).
        errors_by_seed: per rank, the errors of its seeds (lower is better); ragged is fine.
        tol: tolerance; relative (error <= best * (1 + tol)) when ``rel`` else absolute (<= best + tol).
        rel: relative or absolute tolerance.
    """
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"knee_rank: tol={tol!r} must be a finite number >= 0")
    r, errs = _curve(ranks, errors_by_seed)
    return _knee_from_means(r, np.array([e.mean() for e in errs]), float(tol), rel)


def bootstrap_knee(ranks: Sequence[int], errors_by_seed: Sequence[Sequence[float]], tol: float = 0.05,
                   rel: bool = True, n_boot: int = 2000, seed: int = 0, level: float = 0.9) -> Dict[str, Any]:
    """:func:`knee_rank` with a percentile bootstrap interval over seeds.

    Each replicate resamples, independently per rank, that rank's seeds with replacement (runs at
    different ranks are separate trainings, so seeds are not paired across ranks).

    Returns:
        ``knee``, ``lo``, ``hi`` (the ``level`` interval, in swept ranks), ``level``, ``n_seeds``
        (per rank), ``spread`` (False when every rank has a single seed: the interval is then
        degenerate and says nothing about seed noise).
    """
    knee = knee_rank(ranks, errors_by_seed, tol, rel)
    r, errs = _curve(ranks, errors_by_seed)
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_knee: level={level!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    knees = np.empty(n_boot)
    for b in range(n_boot):
        means = np.array([e[rng.integers(0, len(e), len(e))].mean() for e in errs])
        knees[b] = _knee_from_means(r, means, float(tol), rel)
    q = (1 - level) / 2
    return {"knee": knee, "lo": int(np.quantile(knees, q, method="inverted_cdf")),
            "hi": int(np.quantile(knees, 1 - q, method="inverted_cdf")), "level": level,
            "n_seeds": [len(e) for e in errs], "spread": any(len(e) > 1 for e in errs)}


# ----------------------------------------------------------------------------- (b) correlation
def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(v, method="average")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties), via scipy."""
    from scipy.stats import spearmanr

    x, y = _pairs(x, y, "spearman")
    return float(spearmanr(x, y).statistic)


def spearman_with_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Dict[str, Any]:
    """Spearman's rho with a percentile bootstrap interval over (x, y) pairs.

    Replicates in which x or y came out constant (possible with few points) have no rho and are
    dropped; ``n_valid`` reports how many remained.

    Returns:
        ``rho``, ``lo``, ``hi``, ``level``, ``n``, ``n_valid``.
    """
    x, y = _pairs(x, y, "spearman_with_ci")
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    n = len(x)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        xb, yb = x[idx], y[idx]
        if np.ptp(xb) == 0 or np.ptp(yb) == 0:
            continue
        reps.append(np.corrcoef(_ranks(xb), _ranks(yb))[0, 1])
    q = (1 - level) / 2
    lo, hi = (float(np.quantile(reps, q)), float(np.quantile(reps, 1 - q))) if reps else (-1.0, 1.0)
    return {"rho": rho, "lo": lo, "hi": hi, "level": level, "n": n, "n_valid": len(reps)}


#: Largest n whose permutation null :func:`_spearman_null_counts` counts exactly (2^n x ~4 n^3 / 3 floats).
EXACT_MAX_N = 12


def _spearman_null_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many of the n! pairings give each value of S = sum_i a_i b_pi(i), for integer scores a, b >= 0.

    Dynamic programming over the set of b's already used (2^n states): position k = |used| takes
    a_k, and each unused b_j extends the partial sums by a_k b_j. Exact in float64 up to 2^53 counts.
    """
    n = len(a)
    smax = int(np.sort(a) @ np.sort(b))  # the largest S (rearrangement inequality)
    dp = np.zeros((1 << n, smax + 1))
    dp[0, 0] = 1.0
    for mask in range((1 << n) - 1):
        row = dp[mask]
        if not row.any():
            continue
        k = bin(mask).count("1")
        for j in range(n):
            if not mask >> j & 1:
                shift = int(a[k] * b[j])
                dp[mask | 1 << j, shift:] += row[:smax + 1 - shift]
    return dp[-1]


def permutation_pvalue(x: Sequence[float], y: Sequence[float], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho (H0: y independent of x).

    Exact over all n! orderings of y: by enumeration when n! <= ``n_perm`` (so 3 tasks can never
    give p < 1/3: that is the information 3 points carry), by counting (:func:`_spearman_null_counts`
    on doubled average ranks, which are integers) up to n = :data:`EXACT_MAX_N`; beyond that Monte
    Carlo with the +1 correction p = (1 + #{|rho*| >= |rho|}) / (1 + n_perm).
    """
    x, y = _pairs(x, y, "permutation_pvalue")
    n = len(x)
    eps = 1e-12
    if math.factorial(n) > n_perm and n <= EXACT_MAX_N:
        a, b = np.rint(2 * _ranks(x)).astype(np.int64), np.rint(2 * _ranks(y)).astype(np.int64)
        counts = _spearman_null_counts(a, b)
        centre = float(a.sum()) * float(b.sum()) / n
        s = np.arange(counts.size, dtype=np.float64)
        return float(counts[np.abs(s - centre) >= abs(float(a @ b) - centre) - 1e-9].sum() / counts.sum())
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    observed = abs(float(rx @ ry) / denom)
    if math.factorial(n) <= n_perm:
        perms = np.array(list(itertools.permutations(range(n))))
        stats = np.abs(ry[perms] @ rx) / denom
        return float(np.mean(stats >= observed - eps))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    stats = np.abs(ry[perms] @ rx) / denom
    return float((1 + np.sum(stats >= observed - eps)) / (1 + n_perm))


# ----------------------------------------------------------------------------- (d) equal budgets
def budget_matched(runs: Sequence[Mapping[str, Any]], rel_tol: float = 0.1) -> List[Dict[str, Any]]:
    """Group runs of one task into buckets of (nearly) equal adapter-parameter budget.

    Args:
        runs: dicts with ``task``, ``variant`` (e.g. "adaptive", "uniform r=8", "adalora"),
            ``budget`` (adapter parameters, > 0) and ``error``.
        rel_tol: a bucket spans budgets [b0, b0 * (1 + rel_tol)] from its smallest b0.

    Returns:
        Buckets sorted by (task, budget): ``task``, ``budget_lo``, ``budget_hi`` and ``variants``:
        ``{variant: {"errors": [...], "budgets": [...], "mean", "sd", "n"}}``.
    """
    if rel_tol < 0:
        raise ValueError(f"budget_matched: rel_tol={rel_tol!r} must be >= 0")
    for r in runs:
        missing = {"task", "variant", "budget", "error"} - set(r)
        if missing:
            raise ValueError(f"budget_matched: run {dict(r)} lacks {sorted(missing)}")
        if not (math.isfinite(r["budget"]) and r["budget"] > 0 and math.isfinite(r["error"])):
            raise ValueError(f"budget_matched: run {dict(r)} needs a finite budget > 0 and a finite error")
    buckets: List[Dict[str, Any]] = []
    for task in sorted({r["task"] for r in runs}):
        mine = sorted((r for r in runs if r["task"] == task), key=lambda r: (r["budget"], r["variant"], r["error"]))
        current: List[Mapping[str, Any]] = []
        for r in mine + [None]:
            if r is not None and (not current or r["budget"] <= current[0]["budget"] * (1 + rel_tol)):
                current.append(r)
                continue
            variants: Dict[str, Dict[str, Any]] = {}
            for c in current:
                v = variants.setdefault(c["variant"], {"errors": [], "budgets": []})
                v["errors"].append(float(c["error"]))
                v["budgets"].append(float(c["budget"]))
            for v in variants.values():
                e = np.array(v["errors"])
                v.update(mean=float(e.mean()), sd=float(e.std(ddof=1)) if len(e) > 1 else 0.0, n=len(e))
            buckets.append({"task": task, "budget_lo": float(current[0]["budget"]),
                            "budget_hi": float(current[-1]["budget"]), "variants": dict(sorted(variants.items()))})
            current = [r] if r is not None else []
    return buckets


def mean_difference_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> Dict[str, float]:
    """mean(a) - mean(b) with a bootstrap interval resampling each group's seeds independently."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("mean_difference_ci needs two non-empty finite samples")
    rng = np.random.default_rng(seed)
    reps = [a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
            for _ in range(n_boot)]
    q = (1 - level) / 2
    return {"diff": float(a.mean() - b.mean()), "lo": float(np.quantile(reps, q)),
            "hi": float(np.quantile(reps, 1 - q)), "spread": a.size > 1 or b.size > 1}


# ----------------------------------------------------------------------------- verdicts
def verdict(lo: float, hi: float, p: Optional[float] = None, alpha: float = 0.05,
            extra_reasons: Sequence[str] = ()) -> str:
    """The one decision rule of the report, for an effect whose predicted sign is positive.

    held: the interval lies above 0 (and p < alpha when a p-value is given); failed: the interval
    lies below 0 (the opposite of the prediction is resolved); otherwise inconclusive, with reasons.
    ``extra_reasons`` (e.g. "n tasks = 2 < 3") make it inconclusive whatever the numbers say.
    """
    reasons = list(extra_reasons)
    if not reasons:
        if lo > 0 and (p is None or p < alpha):
            return "held"
        if hi < 0:
            return "failed"
        if lo <= 0 <= hi:
            reasons.append("CI spans 0")
        if p is not None and p >= alpha:
            reasons.append(f"p = {p:.3g} >= {alpha:g}")
    return f"inconclusive (reason: {', '.join(reasons)})"


def knee_order_verdict(small: Mapping[str, Any], large: Mapping[str, Any], names: Sequence[str] = ("small", "large")) -> str:
    """(a) for two tasks: does the larger-gap task need a larger rank? Compares :func:`bootstrap_knee`
    results of the smallest-gap (``small``) and largest-gap (``large``) task by their intervals."""
    if not (small["spread"] and large["spread"]):
        return verdict(0, 0, extra_reasons=["1 seed per rank: the knee CIs do not measure seed noise"])
    if large["lo"] > small["hi"]:
        return "held"
    if large["hi"] < small["lo"]:
        return "failed"
    return f"inconclusive (reason: knee CIs of {names[1]} (largest gap) and {names[0]} (smallest) overlap)"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict from several (runs, budget buckets): unanimous held / failed, else inconclusive."""
    if not verdicts:
        raise ValueError("combine_verdicts needs at least one verdict")
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return f"inconclusive (reason: the parts disagree: {sorted(set(verdicts))})"
