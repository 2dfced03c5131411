"""The blocked Gibbs sampler of the rank posterior P(r | D) (the model: :mod:`ibp.rank_posterior`),
and the summary of its draws.

Why not the collapsed IBP Gibbs sampler: collapsing pi couples the rows, so a sweep is N * K+
sequential Python steps (about 50k for Swin-B at mean rank 100). Given pi the rows are independent,
so each O(1) site update z_ik | pi_k, r_i^(-k) is vectorised over all layers and chains and a sweep
is K sequential numpy steps. Mixing of alpha does not suffer the usual uncollapsed slowness because
alpha is drawn with pi integrated out (Metropolis-Hastings: the IBP's conjugate Gamma(a + K+,
b + H_N) as an independence proposal, plus random-walk steps on log alpha, both accepted against
the exact finite-K P(Z | alpha)).

Sweep (a valid blocked Gibbs scan, all chains at once):
  1. (alpha, pi) | Z: alpha | Z by the MH steps above, then
     pi_k | Z, alpha ~ Beta(alpha / K + m_k, N - m_k + 1).
  2. z_ik | pi_k, r_i^(-k) for k = 1..K in fixed order:
     P(z_ik = 1) is proportional to pi_k L_i(r_i^(-k) + 1), P(z_ik = 0) to (1 - pi_k) L_i(r_i^(-k)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.special import gammaln

from ibp.mcmc_diagnostics import effective_sample_size, split_rhat
from ibp.process import harmonic

__all__ = ["IBPRankSampler", "RankPosterior", "initial_log_beta"]

_LOG_CLIP = 700.0  # exp(+-700) stays finite in float64; stands in for +-infinity in the site odds


@dataclass
class RankPosterior:
    """Post-burn-in draws of the rank posterior and their summaries.

    Attributes:
        ranks: [C, S, N] integer rank draws (C chains, S kept sweeps, N layers).
        alpha: [C, S] concentration draws.
        k_plus: [C, S] number of occupied dishes.
        log_beta, gamma, sigma: likelihood parameters the draws were made under.
        alpha_prior: (a, b) of alpha's Gamma prior; ``None`` when alpha was held fixed.
        r_lo, r_hi: rank support.
        truncation: number of dish columns K.
        alpha_accept: acceptance rate of alpha's MH step (NaN when alpha was fixed).
        calibration: the bisection trace of :func:`calibrate_beta`, if one was run.
    """

    ranks: np.ndarray
    alpha: np.ndarray
    k_plus: np.ndarray
    log_beta: float
    gamma: float
    sigma: float
    alpha_prior: Optional[Tuple[float, float]]
    r_lo: int
    r_hi: int
    truncation: int
    alpha_accept: float = float("nan")
    calibration: List[Dict[str, float]] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.ranks.shape[2]

    def _flat(self) -> np.ndarray:
        return self.ranks.reshape(-1, self.n_layers)

    def mean(self) -> np.ndarray:
        """Posterior mean E[r_i | D] [N]."""
        return self._flat().mean(axis=0)

    def sd(self) -> np.ndarray:
        """Posterior standard deviation of r_i [N]."""
        return self._flat().std(axis=0, ddof=1)

    def interval(self, level: float = 0.9) -> np.ndarray:
        """Equal-tailed credible interval [N, 2] (lower, upper quantiles) at ``level``.

        Args:
            level: probability mass inside the interval, in (0, 1).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        tail = (1.0 - level) / 2.0
        return np.quantile(self._flat(), [tail, 1.0 - tail], axis=0, method="inverted_cdf").T

    def mode(self) -> np.ndarray:
        """Posterior mode of each r_i [N] (ties go to the smaller rank)."""
        return self.pmf().argmax(axis=1) + self.r_lo

    def pmf(self) -> np.ndarray:
        """Posterior probability of each rank, [N, r_hi - r_lo + 1], column j is rank r_lo + j."""
        flat = self._flat() - self.r_lo
        width = self.r_hi - self.r_lo + 1
        counts = np.stack([np.bincount(col, minlength=width) for col in flat.T.astype(np.int64)])
        return counts / flat.shape[0]

    def survival(self) -> np.ndarray:
        """P(r_i >= k | D) for k = 0..r_hi + 1, [N, r_hi + 2] (1 below r_lo, 0 above r_hi)."""
        out = np.ones((self.n_layers, self.r_hi + 2))
        tail = np.cumsum(self.pmf()[:, ::-1], axis=1)[:, ::-1]  # P(r >= r_lo + j)
        out[:, self.r_lo:self.r_hi + 1] = tail
        out[:, self.r_hi + 1] = 0.0
        return out

    def rhat(self) -> np.ndarray:
        """Split R-hat of each r_i [N]."""
        return split_rhat(self.ranks)

    def ess(self) -> np.ndarray:
        """Effective sample size of each r_i [N]."""
        return effective_sample_size(self.ranks)

    def mcse(self) -> np.ndarray:
        """Monte-Carlo standard error of each posterior mean [N] (sd / sqrt(ESS))."""
        return self.sd() / np.sqrt(self.ess())

    def expected_cost(self, costs: Sequence[float]) -> float:
        """Posterior expected parameter count sum_i c_i E[r_i | D].

        Args:
            costs: per-layer cost of one unit of rank, c_i = d_in + d_out [N].
        """
        return float(np.dot(np.asarray(costs, dtype=np.float64), self.mean()))

    def diagnostics(self) -> Dict[str, float]:
        """Scalar chain diagnostics: worst R-hat and ESS over layers, alpha and K+ summaries."""
        rhat, ess = self.rhat(), self.ess()
        return {
            "n_chains": int(self.ranks.shape[0]),
            "n_kept_sweeps": int(self.ranks.shape[1]),
            "max_rhat": float(np.max(rhat)),
            "min_ess": float(np.min(ess)),
            "alpha_mean": float(self.alpha.mean()),
            "alpha_rhat": float(split_rhat(self.alpha)),
            "k_plus_mean": float(self.k_plus.mean()),
            "alpha_accept": float(self.alpha_accept),
        }



def _check_gaps(gaps: Sequence[float]) -> np.ndarray:
    gaps = np.asarray(gaps, dtype=np.float64)
    if gaps.ndim != 1 or gaps.size == 0:
        raise ValueError(f"gaps must be a non-empty 1-D sequence, got shape {gaps.shape}")
    if not np.isfinite(gaps).all() or (gaps < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(gaps) | (gaps < 0))[0])
        raise ValueError(f"gaps must be finite and >= 0; entry {bad} is {gaps[bad]!r}")
    if not (gaps > 0).any():
        raise ValueError("at least one gap must be positive: all-zero gaps carry no rank information")
    return gaps


def _log_gaps(gaps: np.ndarray) -> np.ndarray:
    # A zero gap has log -inf; floor it three decades under the smallest positive gap, so it still
    # ranks lowest but stays a finite observation.
    floor = gaps[gaps > 0].min() * 1e-3
    return np.log(np.maximum(gaps, floor))


class IBPRankSampler:
    """Blocked Gibbs sampler for (Z, pi, alpha) given per-layer gaps; ranks are the row sums of Z.

    Args:
        gaps: per-layer gaps D_i >= 0 [N] (zeros are floored, see ``_log_gaps``).
        gamma: power-law exponent of the likelihood (gamma = 1: rank proportional to gap).
        sigma: likelihood standard deviation on log D (``math.inf`` switches the likelihood off).
        alpha_prior: (a, b), shape and rate of alpha's Gamma prior.
        alpha: hold alpha fixed at this value instead of sampling it.
        r_lo, r_hi: rank support [r_lo, r_hi].
        truncation: number of dish columns K (default max(2 * r_hi, 32)); K >= r_hi is required.
        n_chains: independent chains, run vectorised.
        log_beta: initial budget knob (default: :func:`initial_log_beta` for the mean rank).
        seed: seed of the numpy Generator (ignored when ``rng`` is given).
        rng: numpy Generator.
    """

    def __init__(self, gaps: Sequence[float], *, gamma: float = 1.0, sigma: float = 0.1,
                 alpha_prior: Tuple[float, float] = (1.0, 0.1), alpha: Optional[float] = None,
                 r_lo: int = 0, r_hi: int = 64, truncation: Optional[int] = None,
                 n_chains: int = 4, log_beta: Optional[float] = None, seed: int = 0,
                 rng: Optional[np.random.Generator] = None):
        gaps = _check_gaps(gaps)
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive (math.inf switches the likelihood off), got {sigma!r}")
        a, b = (float(v) for v in alpha_prior)
        if not (a > 0 and b > 0):
            raise ValueError(f"alpha_prior (a, b) must both be positive, got {alpha_prior!r}")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite positive number or None, got {alpha!r}")
        if not (0 <= r_lo <= r_hi) or int(r_lo) != r_lo or int(r_hi) != r_hi:
            raise ValueError(f"need integers 0 <= r_lo <= r_hi, got r_lo={r_lo!r}, r_hi={r_hi!r}")
        k = int(truncation) if truncation is not None else max(2 * int(r_hi), 32)
        if k < r_hi or k < 1:
            raise ValueError(f"truncation K={k} must be >= r_hi={r_hi} (a row cannot hold more dishes than K)")
        if int(n_chains) != n_chains or n_chains < 1:
            raise ValueError(f"n_chains must be a positive integer, got {n_chains!r}")
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.log_gaps = _log_gaps(gaps)
        self.n = gaps.size
        self.gamma, self.sigma = float(gamma), float(sigma)
        self.alpha_prior = (a, b)
        self.fixed_alpha = None if alpha is None else float(alpha)
        self.r_lo, self.r_hi, self.k, self.c = int(r_lo), int(r_hi), k, int(n_chains)
        self.h_n = harmonic(self.n)
        self._base = np.arange(self.n) * (self.r_hi + 1)
        self._alpha_moves = [0, 0]  # accepted, proposed
        self.set_log_beta(log_beta if log_beta is not None else float(np.mean(self.log_gaps)))
        self._init_state()

    # -- likelihood tables -------------------------------------------------------------------
    @property
    def likelihood_on(self) -> bool:
        return math.isfinite(self.sigma)

    def log_likelihood_table(self) -> np.ndarray:
        """log L_i(s) for s = 0..r_hi, [N, r_hi + 1]; -inf outside the support [r_lo, r_hi]."""
        s = np.arange(self.r_hi + 1)
        if self.likelihood_on:
            resid = (self.log_gaps[:, None] - self.log_beta) - self.gamma * np.log1p(s)[None, :]
            table = -0.5 * (resid / self.sigma) ** 2
        else:
            table = np.zeros((self.n, s.size))
        table[:, : self.r_lo] = -np.inf
        return table

    def set_log_beta(self, log_beta: float) -> None:
        """Set the budget knob log beta and rebuild the O(1) site-update table.

        Args:
            log_beta: log of beta in log D_i ~ N(log beta + gamma log(1 + r_i), sigma^2).
        """
        if not math.isfinite(log_beta):
            raise ValueError(f"log_beta must be finite, got {log_beta!r}")
        self.log_beta = float(log_beta)
        table = self.log_likelihood_table()
        upper = np.concatenate([table[:, 1:], np.full((self.n, 1), -np.inf)], axis=1)
        with np.errstate(invalid="ignore"):
            log_w = table - upper  # log L(s) / L(s + 1), the odds against adding a dish at s
        # -inf - -inf (both outside the support below r_lo): the row must grow, so odds -> 0.
        log_w = np.where(np.isnan(log_w), -_LOG_CLIP, log_w)
        self._w = np.exp(np.clip(log_w, -_LOG_CLIP, _LOG_CLIP)).ravel()

    # -- state -------------------------------------------------------------------------------
    def restart(self, log_beta: float, rng: Optional[np.random.Generator] = None) -> None:
        """Set log beta and start fresh over-dispersed chains (optionally from another Generator).

        Args:
            log_beta: the budget knob.
            rng: Generator to use from now on (default: keep the current one).
        """
        if rng is not None:
            self.rng = rng
        self.set_log_beta(log_beta)
        self._init_state()

    def _init_state(self) -> None:
        rng, c, n, k = self.rng, self.c, self.n, self.k
        guess = np.exp((self.log_gaps - self.log_beta) / self.gamma) - 1.0 if self.likelihood_on \
            else np.full(n, (self.fixed_alpha or self.alpha_prior[0] / self.alpha_prior[1]))
        # Over-dispersed starts (factor e^{+-0.5}) so split R-hat can see non-convergence.
        jitter = np.exp(0.5 * rng.standard_normal((c, n)))
        r0 = np.clip(np.rint(np.maximum(guess, 0.0) * jitter), self.r_lo, self.r_hi).astype(np.int64)
        keys = rng.random((c, n, k))
        rank_of_key = keys.argsort(axis=2).argsort(axis=2)
        self.Z = np.ascontiguousarray((rank_of_key < r0[:, :, None]).transpose(2, 0, 1))  # [K, C, N]
        self.r = r0
        if self.fixed_alpha is not None:
            self.alpha = np.full(c, self.fixed_alpha)
        else:
            # E[r | alpha] = alpha K / (K + alpha) in the finite model: invert it at the start ranks
            r_bar = np.clip(r0.mean(axis=1), 0.1, 0.9 * k)
            self.alpha = r_bar * k / (k - r_bar) * np.exp(0.3 * rng.standard_normal(c))
        self._update_pi()

    def _counts(self) -> np.ndarray:
        return self.Z.sum(axis=2, dtype=np.int64).T  # [C, K]

    def _log_p_z_given_alpha(self, alpha: np.ndarray, m: np.ndarray) -> np.ndarray:
        """log P(Z | alpha) of the finite model up to alpha-free terms, per chain [C]."""
        a_k = (alpha / self.k)[:, None]
        return np.sum(np.log(a_k) + gammaln(m + a_k) - gammaln(self.n + 1.0 + a_k), axis=1)

    def _update_alpha(self, m: np.ndarray) -> None:
        """alpha | Z with pi integrated out: one independence step, then two random-walk steps.

        The independence proposal is the IBP's conjugate posterior Gamma(a + K+, b + H_N); it is
        accepted against the exact finite-K P(Z | alpha) and nearly always wins when K >> alpha,
        giving large moves. When alpha / K is not small it is often refused, and the random walk on
        log alpha (step 2.4 / sqrt(K+ + a), about the posterior sd) keeps alpha moving.
        """
        a, b = self.alpha_prior
        k_plus = (m > 0).sum(axis=1)

        def log_post(alpha: np.ndarray) -> np.ndarray:
            return (a - 1.0) * np.log(alpha) - b * alpha + self._log_p_z_given_alpha(alpha, m)

        current = log_post(self.alpha)
        prop = self.rng.gamma(a + k_plus, 1.0 / (b + self.h_n))
        proposed = log_post(prop)
        # log q(alpha) = (a + K+ - 1) log alpha - (b + H_N) alpha + const
        log_q = lambda x: (a + k_plus - 1.0) * np.log(x) - (b + self.h_n) * x  # noqa: E731
        self._mh_accept(prop, proposed, current, proposed - current + log_q(self.alpha) - log_q(prop))
        step = 2.4 / np.sqrt(k_plus + a)
        for _ in range(2):
            current = log_post(self.alpha)
            prop = self.alpha * np.exp(step * self.rng.standard_normal(self.c))
            proposed = log_post(prop)
            # random walk on log alpha: the Jacobian adds log(prop / alpha)
            self._mh_accept(prop, proposed, current, proposed - current + np.log(prop / self.alpha))

    def _mh_accept(self, prop: np.ndarray, proposed: np.ndarray, current: np.ndarray,
                   log_ratio: np.ndarray) -> None:
        accept = np.log(self.rng.random(self.c)) < log_ratio
        self.alpha = np.where(accept, prop, self.alpha)
        self._alpha_moves[0] += int(accept.sum())
        self._alpha_moves[1] += self.c

    def _update_pi(self, m: Optional[np.ndarray] = None) -> None:
        m = self._counts() if m is None else m
        shape1 = (self.alpha / self.k)[:, None] + m
        shape2 = (self.n - m + 1).astype(np.float64)
        # Beta via two Gammas, in logs: Gamma(a) = Gamma(a + 1) * U^(1/a) avoids underflow at a << 1.
        log_g1 = np.log(self.rng.standard_gamma(shape1 + 1.0)) + np.log(self.rng.random(shape1.shape)) / shape1
        log_g2 = np.log(self.rng.standard_gamma(shape2))
        log_tot = np.logaddexp(log_g1, log_g2)
        log_pi, log_q = log_g1 - log_tot, log_g2 - log_tot
        # odds against z = 1 from the prior, (1 - pi) / pi, clipped to stay finite
        self._prior_odds = np.exp(np.clip(log_q - log_pi, -_LOG_CLIP, _LOG_CLIP))  # [C, K]

    def sweep(self) -> None:
        """One blocked Gibbs sweep: (alpha, pi) | Z, then every z_ik | pi_k, r_i^(-k) in fixed order.

        The scan order is fixed (k = 0..K-1) on purpose: choosing it from the state, e.g. occupied
        dishes first, would break the invariance of the posterior.
        """
        m = self._counts()
        if self.fixed_alpha is None:
            self._update_alpha(m)
        self._update_pi(m)
        Z, w = self.Z, self._w
        rb = self.r + self._base  # rank + row offset = index into the flat w table
        # P(z=1) = 1 / (1 + odds * w(r^-k)), odds = (1 - pi) / pi; with u uniform,
        # z = [u (1 + odds w) < 1] = [w < (1 - u) / (u odds)]: one gather and one compare per dish.
        u = self.rng.random(Z.shape)
        with np.errstate(divide="ignore"):
            thresh = (1.0 - u) / (u * self._prior_odds.T[:, :, None])
        for kk in range(self.k):
            zk = Z[kk]
            rb -= zk
            np.less(w.take(rb), thresh[kk], out=zk)
            rb += zk
        self.r = rb - self._base

    def run(self, n_sweeps: int, burn_in: int = 0) -> RankPosterior:
        """Run ``burn_in + n_sweeps`` sweeps from the current state and keep the last ``n_sweeps``.

        Args:
            n_sweeps: kept sweeps S (>= 4 for the diagnostics).
            burn_in: discarded sweeps first.
        """
        if int(n_sweeps) != n_sweeps or n_sweeps < 1 or int(burn_in) != burn_in or burn_in < 0:
            raise ValueError(f"need n_sweeps >= 1 and burn_in >= 0, got {n_sweeps!r}, {burn_in!r}")
        self._alpha_moves = [0, 0]
        for _ in range(int(burn_in)):
            self.sweep()
        ranks = np.empty((self.c, int(n_sweeps), self.n), dtype=np.int32)
        alphas = np.empty((self.c, int(n_sweeps)))
        k_plus = np.empty((self.c, int(n_sweeps)), dtype=np.int64)
        for t in range(int(n_sweeps)):
            self.sweep()
            ranks[:, t] = self.r
            alphas[:, t] = self.alpha
            k_plus[:, t] = self.Z.any(axis=2).sum(axis=0)
        acc, prop = self._alpha_moves
        return RankPosterior(
            ranks=ranks, alpha=alphas, k_plus=k_plus, log_beta=self.log_beta, gamma=self.gamma,
            sigma=self.sigma, alpha_prior=None if self.fixed_alpha is not None else self.alpha_prior,
            r_lo=self.r_lo, r_hi=self.r_hi, truncation=self.k,
            alpha_accept=acc / prop if prop else float("nan"))


def initial_log_beta(log_gaps: np.ndarray, costs: np.ndarray, budget: float, gamma: float,
                     r_lo: int, r_hi: int) -> float:
    """log beta at which the likelihood-mode ranks clip(exp((log D - log beta)/gamma) - 1) meet the budget.

    It ignores the prior, so it only starts the bisection of :func:`calibrate_beta`.

    Args:
        log_gaps: log D_i [N].
        costs: c_i [N].
        budget: B.
        gamma: likelihood exponent.
        r_lo, r_hi: rank support.
    """
    def cost(lb: float) -> float:
        r = np.clip(np.exp((log_gaps - lb) / gamma) - 1.0, r_lo, r_hi)
        return float(np.dot(costs, r))

    lo = float(log_gaps.min() - gamma * math.log1p(r_hi) - 1.0)  # every layer at r_hi
    hi = float(log_gaps.max() + 1.0)                              # every layer at r_lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cost(mid) > budget:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
