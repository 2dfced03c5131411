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

from ibp.process import harmonic

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

_LOG_CLIP = 700.0  # exp(+-700) stays finite in float64; stands in for +-infinity in the site odds


# ---------------------------------------------------------------------------- diagnostics
def split_rhat(draws: np.ndarray) -> np.ndarray:
    """Split R-hat (Gelman et al., BDA3 Sec. 11.4) of each trailing coordinate.

    Args:
        draws: [C, S, ...] post-burn-in draws of C chains (S >= 4).

    Returns:
        [...] R-hat; 1.0 where every draw is identical (a constant has converged), inf where the
        chains are constant at different values.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim < 2 or draws.shape[1] < 4:
        raise ValueError(f"split_rhat needs draws [C, S>=4, ...], got shape {draws.shape}")
    half = draws.shape[1] // 2
    chains = np.concatenate([draws[:, :half], draws[:, -half:]], axis=0)  # [2C, half, ...]
    n = half
    means = chains.mean(axis=1)
    within = chains.var(axis=1, ddof=1).mean(axis=0)
    between = n * means.var(axis=0, ddof=1)
    var_plus = (n - 1) / n * within + between / n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(var_plus / within)
    rhat = np.where(within > 0, rhat, np.where(between > 0, np.inf, 1.0))
    return rhat


def effective_sample_size(draws: np.ndarray) -> np.ndarray:
    """Multi-chain effective sample size with Geyer's initial monotone sequence (Stan's estimator).

    Args:
        draws: [C, S, ...] post-burn-in draws.

    Returns:
        [...] ESS, capped at C * S; C * S where the draws are constant.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim < 2 or draws.shape[1] < 4:
        raise ValueError(f"effective_sample_size needs draws [C, S>=4, ...], got shape {draws.shape}")
    c, s = draws.shape[:2]
    centred = draws - draws.mean(axis=1, keepdims=True)
    nfft = 1 << int(math.ceil(math.log2(2 * s)))
    spec = np.fft.rfft(centred, n=nfft, axis=1)
    acov = np.fft.irfft(spec * np.conj(spec), n=nfft, axis=1)[:, :s] / s  # [C, S, ...]
    chain_var = acov[:, 0] * s / (s - 1)
    within = chain_var.mean(axis=0)
    between_over_s = draws.mean(axis=1).var(axis=0, ddof=1) if c > 1 else np.zeros_like(within)
    var_plus = (s - 1) / s * within + between_over_s
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (within - acov.mean(axis=0)) / var_plus  # [S, ...]
    rho = np.nan_to_num(rho, nan=0.0)
    # Geyer: sum pairs Gamma_t = rho_2t + rho_2t+1 while positive, forced monotone non-increasing.
    n_pairs = s // 2
    pairs = rho[: 2 * n_pairs].reshape((n_pairs, 2) + rho.shape[1:]).sum(axis=1)
    positive = np.cumprod(pairs > 0, axis=0).astype(bool)
    pairs = np.minimum.accumulate(np.where(positive, pairs, 0.0), axis=0)
    tau = -1.0 + 2.0 * np.sum(np.where(positive, pairs, 0.0), axis=0)
    tau = np.maximum(tau, 1.0 / math.log10(max(c * s, 10)))
    ess = np.where(var_plus > 0, c * s / tau, c * s)
    return np.minimum(ess, c * s)


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


# ---------------------------------------------------------------------------- posterior summary
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


# ---------------------------------------------------------------------------- sampler
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


# ---------------------------------------------------------------------------- budget calibration
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
