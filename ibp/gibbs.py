"""Collapsed Gibbs sampling for the linear-Gaussian IBP latent feature model.

Model (Griffiths & Ghahramani 2005, "Infinite latent feature models and the Indian buffet
process", NIPS 18; JMLR review 2011)::

    Z ~ IBP(alpha),   A ~ N(0, sigma_A^2 I)  [K+ x D],   X = Z A + E,   E ~ N(0, sigma_X^2 I)  [N x D]

A is integrated out, giving the collapsed likelihood (G&G 2005)::

    P(X | Z) = exp(-tr(X^T (I - Z M Z^T) X) / (2 sigma_X^2))
               / ((2 pi)^(N D / 2) sigma_X^((N - K+) D) sigma_A^(K+ D) |Z^T Z + (sigma_X^2 / sigma_A^2) I|^(D / 2)),
    M = (Z^T Z + (sigma_X^2 / sigma_A^2) I)^-1.

Why the row-predictive form below: P(X | Z) = P(X_-i | Z_-i) P(x_i | z_i, X_-i, Z_-i), and only the
second factor depends on row i. Given the other rows, A has the Gaussian posterior with mean
M_-i Z_-i^T X_-i and covariance sigma_X^2 M_-i per column, so

    x_i | z_i ~ N(z_i Abar, sigma_X^2 (1 + z_i M_-i z_i^T) I_D)   (+ k_new sigma_A^2 I for new dishes).

One K x K inverse per row then makes every z_ik update O(K + D) (the rank-one bookkeeping of
Doshi-Velez & Ghahramani 2009, "Accelerated sampling for the IBP"), instead of a fresh
determinant per site. This is exact, not an approximation.

Moves per sweep:
* z_ik for dishes other customers hold: prior odds m_-i,k / (N - m_-i,k) times the predictive ratio.
* the number of dishes only customer i holds: dropped, then k_new drawn from Poisson(alpha / N) times
  the predictive with k_new fresh Gaussian features, enumerated over 0..k_new_max (G&G 2005 use
  the same truncated enumeration). With the likelihood switched off k_new is drawn exactly.
* swaps: for each held / unheld feature pair of row i, a heat-bath choice between z_i and z_i with
  the two exchanged (same row sum), so a row can leave a duplicate of a feature for the feature.
* duplicates: Metropolis-Hastings merge of two identical columns / split of one into two, on lof
  classes with P([Z]) (see ``_duplicate_move``), twice per sweep.
* sigma_X, sigma_A: random-walk Metropolis on log sigma under a log-uniform prior on [1e-3, 1e3].
* alpha: its conjugate posterior Gamma(a + K+, b + H_N) (rate parameterisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from scipy.special import gammaln

from ibp.process import harmonic, sample_ibp

__all__ = ["LinearGaussianIBP", "GibbsTrace", "collapsed_log_likelihood"]

_LOG_2PI = math.log(2.0 * math.pi)
_SIGMA_BOUNDS = (1e-3, 1e3)


def collapsed_log_likelihood(X: np.ndarray, Z: np.ndarray, sigma_x: float, sigma_a: float) -> float:
    """log P(X | Z, sigma_X, sigma_A) with A integrated out (the G&G 2005 formula above).

    Args:
        X: data [N, D].
        Z: binary features [N, K] (K may be 0).
        sigma_x: noise standard deviation.
        sigma_a: feature-value prior standard deviation.
    """
    X = np.asarray(X, dtype=np.float64)
    Zf = np.asarray(Z, dtype=np.float64)
    n, d = X.shape
    k = Zf.shape[1]
    sx2, ratio = sigma_x ** 2, (sigma_x / sigma_a) ** 2
    quad = float(np.sum(X * X))
    logdet = 0.0
    if k:
        chol = np.linalg.cholesky(Zf.T @ Zf + ratio * np.eye(k))
        logdet = 2.0 * float(np.sum(np.log(np.diag(chol))))
        proj = np.linalg.solve(chol, Zf.T @ X)  # L^-1 Z^T X, so ||proj||^2 = tr(X^T Z M Z^T X)
        quad -= float(np.sum(proj * proj))
    return (-0.5 * n * d * _LOG_2PI - (n - k) * d * math.log(sigma_x) - k * d * math.log(sigma_a)
            - 0.5 * d * logdet - 0.5 * quad / sx2)


@dataclass
class GibbsTrace:
    """Per-sweep record of a :class:`LinearGaussianIBP` run.

    Attributes:
        k_plus: number of active features after each sweep [n_sweeps].
        alpha, sigma_x, sigma_a: hyperparameters after each sweep [n_sweeps].
        log_likelihood: collapsed log P(X | Z) after each sweep (NaN with the likelihood off).
        Z: the final feature matrix [N, K+].
    """

    k_plus: np.ndarray
    alpha: np.ndarray
    sigma_x: np.ndarray
    sigma_a: np.ndarray
    log_likelihood: np.ndarray
    Z: np.ndarray


class LinearGaussianIBP:
    """Collapsed Gibbs sampler for Z (and alpha, sigma_X, sigma_A) in the linear-Gaussian IBP model.

    Args:
        X: data [N, D]. With ``likelihood=False`` only N is used.
        alpha: initial (or fixed) IBP concentration.
        sigma_x: initial (or fixed) noise standard deviation.
        sigma_a: initial (or fixed) feature prior standard deviation.
        sample_alpha: resample alpha from Gamma(a + K+, b + H_N) each sweep.
        alpha_prior: (a, b) shape and rate of alpha's Gamma prior.
        sample_sigma: Metropolis-update sigma_X and sigma_A each sweep.
        k_new_max: largest number of new dishes a row may open in one step.
        likelihood: False samples from the IBP prior only (a check of the sampler's moments).
        Z_init: starting features [N, K]; default: ``init_features`` random Bernoulli(1/2)
            columns (a draw from the IBP prior when the likelihood is off).
        init_features: width of the default over-complete start.
        seed: seed for the sampler's numpy Generator (ignored when ``rng`` is given).
        rng: numpy Generator to use instead of ``seed``.
    """

    def __init__(self, X: np.ndarray, *, alpha: float = 1.0, sigma_x: float = 1.0,
                 sigma_a: float = 1.0, sample_alpha: bool = True,
                 alpha_prior: Tuple[float, float] = (1.0, 1.0), sample_sigma: bool = True,
                 k_new_max: int = 4, likelihood: bool = True, Z_init: Optional[np.ndarray] = None,
                 init_features: int = 10, seed: int = 0,
                 rng: Optional[np.random.Generator] = None):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 1:
            raise ValueError(f"X must be a 2-D array [N, D] with N >= 1, got shape {X.shape}")
        if likelihood and not np.isfinite(X).all():
            raise ValueError("X contains non-finite values")
        for name, value in (("alpha", alpha), ("sigma_x", sigma_x), ("sigma_a", sigma_a)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        a, b = alpha_prior
        if not (a > 0 and b > 0):
            raise ValueError(f"alpha_prior (a, b) must both be positive, got {alpha_prior!r}")
        if int(k_new_max) != k_new_max or k_new_max < 1:
            raise ValueError(f"k_new_max must be a positive integer, got {k_new_max!r}")
        self.X = X
        self.n, self.d = X.shape
        self.alpha, self.sigma_x, self.sigma_a = float(alpha), float(sigma_x), float(sigma_a)
        self.sample_alpha, self.sample_sigma = bool(sample_alpha), bool(sample_sigma and likelihood)
        self.alpha_prior = (float(a), float(b))
        self.k_new_max = int(k_new_max)
        self.likelihood = bool(likelihood)
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.h_n = harmonic(self.n)
        # Step sizes on log sigma, adapted toward ~40% acceptance with a diminishing gain.
        self._log_step = {"sigma_x": 0.05, "sigma_a": 0.1}
        self._n_sweeps = 0
        if Z_init is None and not self.likelihood:
            Z_init = sample_ibp(self.alpha, self.n, self.rng)
        elif Z_init is None:
            # Over-complete random start: surplus features specialise or die (deaths and merges
            # are easy moves), whereas an under-complete start tends to park in modes where one
            # feature stands for a sum of true ones, and single-row births cannot split it.
            Z_init = (self.rng.random((self.n, int(init_features))) < 0.5).astype(np.int8)
        Z_init = np.asarray(Z_init)
        if Z_init.ndim != 2 or Z_init.shape[0] != self.n or not np.isin(Z_init, (0, 1)).all():
            raise ValueError(f"Z_init must be binary with {self.n} rows, got shape {Z_init.shape}")
        self._set_state(Z_init)

    # ------------------------------------------------------------------ Z updates
    def _set_state(self, Z: np.ndarray) -> None:
        """Install Z and its sufficient statistics m = 1^T Z, Z^T Z and Z^T X (kept incrementally)."""
        self.Z = np.ascontiguousarray(Z[:, Z.any(axis=0)], dtype=np.float64)
        self._m = self.Z.sum(axis=0)
        self._ztz = self.Z.T @ self.Z
        self._ztx = self.Z.T @ self.X

    def _update_row(self, i: int) -> None:
        rng, n = self.rng, self.n
        Z, m, ztz, ztx = self.Z, self._m, self._ztz, self._ztx
        z = Z[i].copy()
        x = self.X[i]
        keep = (m - z) > 0  # row i's singletons are re-drawn below as "new dishes"
        if not keep.all():
            Z, m, ztz, ztx, z = Z[:, keep], m[keep], ztz[keep][:, keep], ztx[keep], z[keep]
        k = Z.shape[1]
        m_minus = m - z
        # Sufficient statistics of the other rows: remove row i's outer products.
        gram_minus = ztz - np.outer(z, z)
        ztx_minus = ztx - np.outer(z, x)
        uniforms = rng.random(k)
        if not self.likelihood:
            z = (uniforms < m_minus / n).astype(np.float64)
            k_new = int(rng.poisson(self.alpha / n))
        else:
            sx2, sa2 = self.sigma_x ** 2, self.sigma_a ** 2
            if k:
                M = np.linalg.inv(gram_minus + (sx2 / sa2) * np.eye(k))
                a_bar = M @ ztx_minus  # posterior mean of A given Z_-i, X_-i
            else:
                M, a_bar = np.zeros((0, 0)), np.zeros((0, self.d))
            # Everything the site loop needs is a scalar or a K-vector:
            # ||x - z a||^2 = x.x - 2 z.g + z G z, with g = a_bar x and G = a_bar a_bar^T.
            g = a_bar @ x
            gaa = a_bar @ a_bar.T
            mz, u = M @ z, gaa @ z
            q = float(z @ mz)
            rr = float(x @ x) - 2.0 * float(z @ g) + float(z @ u)
            m_diag, g_diag = np.diag(M).tolist(), np.diag(gaa).tolist()
            g_list, zl = g.tolist(), z.tolist()
            log_prior_odds = (np.log(m_minus) - np.log(n - m_minus)).tolist()
            half_d = 0.5 * self.d
            for kk in range(k):
                zk, m_kk, a_kk = zl[kk], m_diag[kk], g_diag[kk]
                mz_k, u_k = float(mz[kk]), float(u[kk])
                # quantities with z_ik = 0 (undo this bit if it is on)
                ra0 = g_list[kk] - (u_k - zk * a_kk)               # r0 . a_k
                rr0 = rr + zk * (2.0 * (g_list[kk] - u_k) + a_kk)  # ||r0||^2
                q0 = q - zk * (2.0 * mz_k - m_kk)
                q1 = q0 + 2.0 * (mz_k - zk * m_kk) + m_kk
                rr1 = rr0 - 2.0 * ra0 + a_kk
                v0, v1 = sx2 * (1.0 + q0), sx2 * (1.0 + q1)
                logit = (log_prior_odds[kk] - half_d * math.log(v1 / v0)
                         - 0.5 * (rr1 / v1 - rr0 / v0))
                new = 1.0 if uniforms[kk] * (1.0 + math.exp(min(-logit, 700.0))) < 1.0 else 0.0
                if new != zk:
                    delta = new - zk
                    rr, q = (rr1, q1) if new else (rr0, q0)
                    mz = mz + delta * M[:, kk]
                    u = u + delta * gaa[:, kk]
                    zl[kk] = new
            if k > 1:
                rr, q = self._swap_moves(zl, M, gaa, g_list, log_prior_odds, mz, u, rr, q, sx2)
            z = np.asarray(zl, dtype=np.float64)
            # new dishes: Poisson(alpha / N) prior times the predictive with k fresh N(0, sa2) rows
            v = sx2 * (1.0 + q) + self._ks * sa2
            log_post = self._log_poisson_new - half_d * np.log(v) - 0.5 * rr / v
            cdf = np.cumsum(np.exp(log_post - log_post.max()))
            k_new = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        Z[i] = z
        m = m_minus + z
        ztz = gram_minus + np.outer(z, z)
        ztx = ztx_minus + np.outer(z, x)
        if k_new:
            # k_new columns held by row i only: append their statistics in closed form.
            block = np.zeros((n, k_new))
            block[i] = 1.0
            Z = np.concatenate([Z, block], axis=1)
            m = np.concatenate([m, np.ones(k_new)])
            cross = np.repeat(z[:, None], k_new, axis=1)
            ztz = np.block([[ztz, cross], [cross.T, np.ones((k_new, k_new))]])
            ztx = np.concatenate([ztx, np.repeat(x[None, :], k_new, axis=0)])
        self.Z, self._m, self._ztz, self._ztx = Z, m, ztz, ztx

    def _swap_moves(self, zl, M, gaa, g_list, log_prior_odds, mz, u, rr, q, sx2):
        """Heat-bath choice between z_i and z_i with one held and one unheld feature exchanged.

        Why: single-site updates cannot move a row from a duplicate of a feature to the feature
        itself (dropping one first costs fit, adding one first double-counts it), which leaves
        chains stuck with a spurious extra feature. Choosing between the two states in proportion
        to their posterior is a valid Gibbs step on that two-state set; the row sum is unchanged.
        """
        half_d = 0.5 * self.d
        m_diag, g_diag = np.diag(M), np.diag(gaa)
        on = [kk for kk, v in enumerate(zl) if v]
        off = [kk for kk, v in enumerate(zl) if not v]
        uniforms = self.rng.random(len(on) * len(off)).tolist()
        t = 0
        for kk in on:
            for ll in off:
                if not zl[kk] or zl[ll]:  # an earlier swap in this loop changed one of them
                    t += 1
                    continue
                # z' = z - e_k + e_l
                q1 = q + m_diag[kk] + m_diag[ll] - 2.0 * M[kk, ll] - 2.0 * mz[kk] + 2.0 * mz[ll]
                ra_k, ra_l = g_list[kk] - u[kk], g_list[ll] - u[ll]  # r . a_k, r . a_l
                rr1 = rr + 2.0 * ra_k - 2.0 * ra_l + g_diag[kk] + g_diag[ll] - 2.0 * gaa[kk, ll]
                v0, v1 = sx2 * (1.0 + q), sx2 * (1.0 + q1)
                logit = (log_prior_odds[ll] - log_prior_odds[kk] - half_d * math.log(v1 / v0)
                         - 0.5 * (rr1 / v1 - rr / v0))
                if uniforms[t] * (1.0 + math.exp(min(-logit, 700.0))) < 1.0:
                    zl[kk], zl[ll] = 0.0, 1.0
                    mz += M[:, ll] - M[:, kk]
                    u += gaa[:, ll] - gaa[:, kk]
                    rr, q = rr1, q1
                t += 1
        return rr, q

    def _duplicate_move(self) -> None:
        """Metropolis-Hastings between "two identical columns" and "one column" (merge / split).

        Why: a chain can park several identical copies of a feature (every row holding all of
        them), a mode single-site moves cannot leave because each row would have to drop all copies
        at once. The move acts on lof classes: merge two copies of a history h (K_h -> K_h - 1) or
        duplicate a random column (K_h -> K_h + 1). With P([Z]) from G&G 2005,
        P([Z'])/P([Z]) for a merge is K_h / (alpha * (N - m)! (m - 1)! / N!); the proposal
        probabilities (merge: 1/2 * 1/#{h: K_h >= 2}; split: 1/2 * K_h / K+) complete the ratio.
        """
        Z = self.Z
        k_plus = Z.shape[1]
        if k_plus == 0:
            return
        keys = [Z[:, j].tobytes() for j in range(k_plus)]
        groups: dict = {}
        for j, key in enumerate(keys):
            groups.setdefault(key, []).append(j)
        dup = [cols for cols in groups.values() if len(cols) >= 2]
        n = self.n
        if self.rng.random() < 0.5:  # merge
            if not dup:
                return
            cols = dup[int(self.rng.integers(len(dup)))]
            k_h, m = len(cols), int(Z[:, cols[0]].sum())
            Z_new = np.delete(Z, cols[0], axis=1)
            log_w = gammaln(n - m + 1.0) + gammaln(m) - gammaln(n + 1.0)
            log_prior = math.log(k_h) - math.log(self.alpha) - log_w
            log_q = math.log((k_h - 1) / (k_plus - 1)) - math.log(1.0 / len(dup))
        else:  # split: duplicate a uniformly chosen column
            j = int(self.rng.integers(k_plus))
            cols = groups[keys[j]]
            k_h, m = len(cols), int(Z[:, j].sum())
            Z_new = np.concatenate([Z, Z[:, j:j + 1]], axis=1)
            n_dup_after = len(dup) + (1 if k_h == 1 else 0)
            log_w = gammaln(n - m + 1.0) + gammaln(m) - gammaln(n + 1.0)
            log_prior = math.log(self.alpha) + log_w - math.log(k_h + 1)
            log_q = math.log(1.0 / n_dup_after) - math.log(k_h / k_plus)
        if self.likelihood:
            log_lik = (collapsed_log_likelihood(self.X, Z_new, self.sigma_x, self.sigma_a)
                       - collapsed_log_likelihood(self.X, Z, self.sigma_x, self.sigma_a))
        else:
            log_lik = 0.0
        if math.log(self.rng.random()) < log_prior + log_lik + log_q:
            self._set_state(Z_new)

    # ------------------------------------------------------------------ hyperparameters
    def _update_alpha(self) -> None:
        a, b = self.alpha_prior
        k_plus = self.Z.shape[1]
        self.alpha = float(self.rng.gamma(a + k_plus, 1.0 / (b + self.h_n)))

    def _update_sigmas(self, n_steps: int = 3) -> None:
        lo, hi = _SIGMA_BOUNDS
        current = collapsed_log_likelihood(self.X, self.Z, self.sigma_x, self.sigma_a)
        for name in ("sigma_x", "sigma_a"):
            accepted = 0
            for _ in range(n_steps):
                old = getattr(self, name)
                prop = old * math.exp(self._log_step[name] * self.rng.standard_normal())
                if not lo < prop < hi:
                    continue
                setattr(self, name, prop)
                cand = collapsed_log_likelihood(self.X, self.Z, self.sigma_x, self.sigma_a)
                # log-uniform prior + symmetric walk on log sigma: the ratio is the likelihood's
                if math.log(self.rng.random()) < cand - current:
                    current, accepted = cand, accepted + 1
                else:
                    setattr(self, name, old)
            # Robbins-Monro nudge toward ~40% acceptance; the gain decays like 1/sqrt(t), so the
            # adaptation vanishes and the chain keeps the posterior as its limit.
            gain = 1.0 / math.sqrt(1.0 + self._n_sweeps)
            self._log_step[name] *= math.exp(gain * (accepted / n_steps - 0.4))

    # ------------------------------------------------------------------ driver
    def sweep(self) -> None:
        """One pass over all rows, then the hyperparameter updates."""
        self._ks = np.arange(self.k_new_max + 1, dtype=np.float64)
        self._log_poisson_new = self._ks * math.log(self.alpha / self.n) - gammaln(self._ks + 1.0)
        # A fresh random row order each sweep (a mixture of valid scans) helps the sampler leave
        # configurations where two features have swapped roles between blocks of rows.
        for i in self.rng.permutation(self.n):
            self._update_row(int(i))
        for _ in range(2):
            self._duplicate_move()
        self._n_sweeps += 1
        if self.sample_sigma:
            self._update_sigmas()
        if self.sample_alpha:
            self._update_alpha()

    def log_likelihood(self) -> float:
        """Collapsed log P(X | Z) at the current state (NaN with the likelihood off)."""
        if not self.likelihood:
            return float("nan")
        return collapsed_log_likelihood(self.X, self.Z, self.sigma_x, self.sigma_a)

    def posterior_mean_features(self) -> np.ndarray:
        """E[A | X, Z] = M Z^T X [K+, D]: the learned feature images at the current Z."""
        k = self.Z.shape[1]
        ratio = (self.sigma_x / self.sigma_a) ** 2
        return np.linalg.solve(self.Z.T @ self.Z + ratio * np.eye(k), self.Z.T @ self.X)

    def run(self, n_sweeps: int) -> GibbsTrace:
        """Run ``n_sweeps`` sweeps and record K+, hyperparameters and log-likelihood after each.

        Args:
            n_sweeps: number of sweeps (discard a burn-in prefix of the trace yourself).
        """
        if int(n_sweeps) != n_sweeps or n_sweeps < 1:
            raise ValueError(f"n_sweeps must be a positive integer, got {n_sweeps!r}")
        rec = {key: np.empty(int(n_sweeps)) for key in ("k", "alpha", "sx", "sa", "ll")}
        for t in range(int(n_sweeps)):
            self.sweep()
            rec["k"][t] = self.Z.shape[1]
            rec["alpha"][t], rec["sx"][t], rec["sa"][t] = self.alpha, self.sigma_x, self.sigma_a
            rec["ll"][t] = self.log_likelihood()
        return GibbsTrace(k_plus=rec["k"].astype(np.int64), alpha=rec["alpha"], sigma_x=rec["sx"],
                          sigma_a=rec["sa"], log_likelihood=rec["ll"],
                          Z=self.Z.astype(np.int8))
