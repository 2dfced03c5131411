"""P(r | D): per-layer LoRA ranks as row sums of an IBP feature matrix, sampled as a real posterior.

Design (with an uncollapsed sampler, chosen for speed):

* Customers are the N adapted Linear layers, dishes are rank-1 components, Z in {0,1}^(N x K) and
  layer i's rank is its row sum r_i = sum_k z_ik.
* Prior: the finite beta-Bernoulli feature model whose K -> infinity limit *is* the IBP (Griffiths &
  Ghahramani 2005; JMLR review 2011, "a finite feature model"):
  pi_k | alpha ~ Beta(alpha / K, 1), z_ik | pi_k ~ Bernoulli(pi_k), alpha ~ Gamma(a, b) (rate b).
  Shared dish popularities pi make layers borrow strength: given pi the ranks are i.i.d.
  Poisson-binomial, so the prior pulls every layer toward a common level that alpha sets. The
  truncation K (default 2 r_max, at least 32; the allocator also keeps K >= 4x the mean rank the
  budget implies) changes E[r_i | alpha] from alpha to alpha K / (K + alpha) and E[K+] from
  alpha H_N to K (1 - Gamma(1 + alpha/K) N! / Gamma(N + 1 + alpha/K)); tests pin both
  (:func:`finite_prior_moments`).
* Rank support: r_i is restricted to [r_min, r_max] (the prior conditioned on the ranks a rank map
  may use), so posterior means are already valid ranks and the budget equation uses them unclipped.
* Likelihood: the gap carries the rank information through a power law,
      log D_i ~ Normal(log beta + gamma * log(1 + r_i), sigma^2),
  gamma = 1 meaning "rank proportional to gap". It depends on Z only through r_i, which is what
  makes every z_ik update O(1). beta is the budget knob: larger beta, smaller ranks; it is set by
  root finding on log beta so that the posterior expected cost sum_i c_i E[r_i | D] equals the
  budget (:func:`calibrate_beta`). sigma says how literally the power law is trusted: sigma ->
  infinity returns the prior, small sigma makes ranks follow the gaps. gamma, beta and sigma can
  be fitted by empirical Bayes from a rank sweep (``rank_estimation.allocate.fit_gamma``).
* What the prior does to the ranks: it is exchangeable, so given pi every r_i has the same
  Poisson-binomial law (variance <= mean); it shrinks ranks toward a common level and only the
  likelihood spreads them. With the default sigma = 0.1 a Swin-B gap profile gives
  log(1 + E[r_i | D]) a slope of about 0.8-0.9 / gamma in log D_i (exactly 1 / gamma without the
  prior). The likelihood is Gaussian on purpose: a location family with a monotone likelihood
  ratio keeps E[r_i | D] non-decreasing in D_i, whereas a heavy-tailed (Student-t) likelihood makes
  an outlying layer's rank fall back toward the pack as its gap grows (tried, and it broke the
  monotonicity test). Outliers are still flagged: the likelihood's width in r grows like 1 + r
  and the prior-likelihood conflict adds to it, so an outlying gap gets a wide interval and a
  shrunken mean rather than a silent extreme rank.

The sampler is :class:`ibp.rank_sampler.IBPRankSampler`; this module adds the budget calibration
and the one-call entry point :func:`sample_rank_posterior`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.special import gammaln

from ibp.mcmc_diagnostics import effective_sample_size, split_rhat
from ibp.process import harmonic
from ibp.rank_sampler import IBPRankSampler, RankPosterior, initial_log_beta

__all__ = [
    "IBPRankSampler",
    "RankPosterior",
    "calibrate_beta",
    "sample_rank_posterior",
    "initial_log_beta",
    "finite_prior_moments",
    "split_rhat",
    "effective_sample_size",
]


def finite_prior_moments(alpha: float, n_layers: int, truncation: int) -> Dict[str, float]:
    """Prior moments of the truncated beta-Bernoulli model, next to their IBP limits.

    Args:
        alpha: concentration.
        n_layers: N.
        truncation: K.

    Returns:
        dict with ``mean_rank`` (alpha K / (K + alpha)), ``mean_rank_ibp`` (alpha),
        ``mean_k_plus`` (K (1 - E[(1 - pi)^N])) and ``mean_k_plus_ibp`` (alpha H_N).
    """
    a = alpha / truncation
    log_e_empty = gammaln(1.0 + a) + gammaln(n_layers + 1.0) - gammaln(n_layers + 1.0 + a)
    return {
        "mean_rank": alpha * truncation / (truncation + alpha),
        "mean_rank_ibp": float(alpha),
        "mean_k_plus": float(truncation * -np.expm1(log_e_empty)),
        "mean_k_plus_ibp": alpha * harmonic(n_layers),
    }




def calibrate_beta(sampler: IBPRankSampler, costs: Sequence[float], budget: float, *,
                   burn_sweeps: int = 10, eval_sweeps: int = 20, rel_tol: float = 0.02,
                   max_iter: int = 12) -> List[Dict[str, float]]:
    """Set ``sampler``'s log beta by bracketed root finding so that sum_i c_i E[r_i | D] ~= budget.

    The root is of g(log beta) = log(expected cost / budget), which falls monotonically in
    log beta and is close to linear (slope about -1 / gamma, since r + 1 ~ (D / beta)^(1/gamma)).
    Until the root is bracketed, Newton steps with that slope (or the secant slope of the last two
    points) are taken; once bracketed, false-position steps with bisection as the safeguard (a
    step landing in the outer 10% of the bracket is replaced by the midpoint). Each evaluation
    restarts the chains at the new beta from the same seed, runs ``burn_sweeps`` sweeps and
    averages the cost over ``eval_sweeps`` more; Monte-Carlo noise makes ``rel_tol`` of about 1-2%
    the useful floor, and the rank-map repair restores the exact budget afterwards.

    Args:
        sampler: the sampler to calibrate (its state and log beta are changed in place).
        costs: c_i [N].
        budget: B, strictly between sum c_i r_lo and sum c_i r_hi.
        burn_sweeps, eval_sweeps: sweeps per evaluation.
        rel_tol: relative tolerance on the expected cost.
        max_iter: cap on evaluations.

    Returns:
        The trace: one dict per evaluation with ``log_beta``, ``expected_cost`` and ``rel_error``;
        the sampler is restarted (fresh chains, its own random stream) at the best log beta found.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (sampler.n,):
        raise ValueError(f"costs must have shape ({sampler.n},), got {costs.shape}")
    lo_cost, hi_cost = costs.sum() * sampler.r_lo, costs.sum() * sampler.r_hi
    if not (budget > 0 and lo_cost <= budget <= hi_cost):
        raise ValueError(f"budget {budget} is outside the reachable range [{lo_cost:.0f}, {hi_cost:.0f}]")
    if not sampler.likelihood_on:
        raise ValueError("calibrate_beta needs the likelihood on (finite sigma): beta only acts through it")
    trace: List[Dict[str, float]] = []

    # Common random numbers: every evaluation restarts the chains from the same seed, so g is a
    # nearly smooth function of log beta and false position is not thrown off by chain-to-chain
    # noise or by the lag a warm start would carry over from the previous beta.
    crn_seed = int(sampler.rng.integers(2 ** 63))
    stream = sampler.rng

    def evaluate(lb: float) -> float:
        sampler.restart(lb, np.random.default_rng(crn_seed))
        post = sampler.run(eval_sweeps, burn_in=burn_sweeps)
        cost = post.expected_cost(costs)
        trace.append({"log_beta": lb, "expected_cost": cost, "rel_error": (cost - budget) / budget})
        return math.log(max(cost, 1e-6 * budget) / budget)

    lb = initial_log_beta(sampler.log_gaps, costs, budget, sampler.gamma, sampler.r_lo, sampler.r_hi)
    g = evaluate(lb)
    lo: Optional[Tuple[float, float]] = (lb, g) if g > 0 else None  # cost above budget
    hi: Optional[Tuple[float, float]] = None if g > 0 else (lb, g)   # cost below budget
    prev: Optional[Tuple[float, float]] = None
    max_step = 2.0 * sampler.gamma
    while abs(math.expm1(g)) > rel_tol and len(trace) < max_iter:
        if lo is None or hi is None:
            slope = -1.0 / sampler.gamma
            if prev is not None and lb != prev[0] and (g - prev[1]) / (lb - prev[0]) < 0:
                slope = (g - prev[1]) / (lb - prev[0])
            step = float(np.clip(-g / slope, -max_step, max_step))
            step = math.copysign(max(abs(step), 0.05 * sampler.gamma), step)
            new_lb = lb + step
        else:
            width = hi[0] - lo[0]
            if width < 1e-4:
                break
            new_lb = lo[0] - lo[1] * width / (hi[1] - lo[1])
            if not lo[0] + 0.1 * width < new_lb < hi[0] - 0.1 * width:
                new_lb = lo[0] + 0.5 * width
        prev = (lb, g)
        lb = new_lb
        g = evaluate(lb)
        if g > 0:
            lo = (lb, g) if lo is None or lb > lo[0] else lo
        else:
            hi = (lb, g) if hi is None or lb < hi[0] else hi
    best = min(trace, key=lambda row: abs(row["rel_error"]))
    sampler.restart(best["log_beta"], stream)
    return trace


def sample_rank_posterior(gaps: Sequence[float], *, costs: Optional[Sequence[float]] = None,
                          budget: Optional[float] = None, n_sweeps: int = 300, burn_in: int = 100,
                          calibration: Optional[Dict[str, float]] = None,
                          **sampler_kwargs) -> RankPosterior:
    """Sample P(r | D), first calibrating beta to the budget when ``costs`` and ``budget`` are given.

    Args:
        gaps: per-layer gaps D_i [N].
        costs: c_i [N] (needed with ``budget``).
        budget: B; None keeps the sampler's log beta (``log_beta=`` in ``sampler_kwargs``).
        n_sweeps: kept sweeps of the final run.
        burn_in: discarded sweeps of the final run.
        calibration: keyword arguments for :func:`calibrate_beta`.
        **sampler_kwargs: passed to :class:`IBPRankSampler`.
    """
    sampler = IBPRankSampler(gaps, **sampler_kwargs)
    trace: List[Dict[str, float]] = []
    if budget is not None:
        if costs is None:
            raise ValueError("a budget needs per-layer costs")
        trace = calibrate_beta(sampler, costs, budget, **(calibration or {}))
    post = sampler.run(n_sweeps, burn_in=burn_in)
    post.calibration = trace
    return post
