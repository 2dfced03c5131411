"""Tests of the IBP prior, the linear-Gaussian collapsed Gibbs sampler and the rank posterior P(r | D).

Monte-Carlo checks use fixed seeds and a tolerance of 4 standard errors; for MCMC output the
standard error comes from the effective sample size, so a correlated chain cannot pass by luck.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from scipy import integrate, stats

from ibp.gibbs import LinearGaussianIBP, collapsed_log_likelihood
from ibp.process import (harmonic, left_ordered_form, log_prob_lof, log_prob_sequential, sample_ibp,
                         sample_stick_breaking, stick_breaking_missing_mass)
from ibp.mcmc_diagnostics import effective_sample_size, split_rhat
from ibp.rank_posterior import calibrate_beta, finite_prior_moments
from ibp.rank_sampler import IBPRankSampler

Z_SCORE = 4.0


def _assert_mean(samples, expected, se=None, what=""):
    samples = np.asarray(samples, dtype=np.float64)
    se = samples.std(ddof=1) / math.sqrt(samples.size) if se is None else se
    assert abs(samples.mean() - expected) <= Z_SCORE * se, (
        f"{what}: mean {samples.mean():.4f} vs expected {expected:.4f} (4 SE = {Z_SCORE * se:.4f})")


def _mcmc_mean_se(chains):
    """Mean and ESS-based standard error of a [C, S] MCMC series."""
    chains = np.asarray(chains, dtype=np.float64)
    ess = float(effective_sample_size(chains))
    return chains.mean(), chains.std(ddof=1) / math.sqrt(ess)


# ---------------------------------------------------------------------------- the prior
def test_restaurant_moments():
    """K+ ~ Poisson(alpha H_N) and every row sum ~ Poisson(alpha): means and variances."""
    rng = np.random.default_rng(0)
    alpha, n, draws = 2.5, 8, 6000
    mats = [sample_ibp(alpha, n, rng) for _ in range(draws)]
    k_plus = np.array([z.shape[1] for z in mats])
    lam = alpha * harmonic(n)
    _assert_mean(k_plus, lam, math.sqrt(lam / draws), "E[K+]")
    # Var of a sample variance of Poisson(l): (l + 2 l^2) / n to leading order
    _assert_mean(k_plus.var(ddof=1), lam, math.sqrt((lam + 2 * lam ** 2) / draws), "Var[K+]")
    for row in (0, n - 1):  # first and last customer: both marginally Poisson(alpha)
        sums = np.array([z[row].sum() for z in mats])
        _assert_mean(sums, alpha, math.sqrt(alpha / draws), f"E[row {row} sum]")
        _assert_mean(sums.var(ddof=1), alpha, math.sqrt((alpha + 2 * alpha ** 2) / draws),
                     f"Var[row {row} sum]")


def _lof_classes(n, k_max):
    """Every lof equivalence class with K+ <= k_max, as a lof matrix (multisets of histories)."""
    histories = sorted((h for h in itertools.product((0, 1), repeat=n) if any(h)), reverse=True)
    for k in range(k_max + 1):
        for combo in itertools.combinations_with_replacement(range(len(histories)), k):
            cols = [histories[j] for j in combo]
            yield k, np.array(cols, dtype=np.int8).T.reshape(n, k)


def test_lof_class_probabilities_sum_to_one_for_n3():
    """sum over all lof classes of P([Z]) = 1; per K+ the mass is Poisson(alpha H_N)."""
    alpha, n = 0.5, 3
    lam = alpha * harmonic(n)
    k_max = int(stats.poisson.isf(1e-7, lam))  # mass beyond k_max < 1e-7
    per_k = Counter()
    seq_small, class_small = 0.0, 0.0
    for k, Z in _lof_classes(n, k_max):
        p = math.exp(log_prob_lof(Z, alpha))
        per_k[k] += p
        if k <= 3:  # lof order is first-tasting order, so the sequential formula applies
            class_small += p
            seq_small += math.exp(log_prob_sequential(Z, alpha))
    assert abs(sum(per_k.values()) - 1.0) < 1e-6
    for k, mass in per_k.items():
        assert abs(mass - stats.poisson.pmf(k, lam)) < 1e-10, f"K+={k}"
    # The sequential-draw formula (prod_i K1^(i)!) under-counts classes: it is not P([Z]).
    assert seq_small < class_small - 1e-3


def test_restaurant_lof_frequencies_match_class_probability():
    """Empirical frequencies of lof classes from the restaurant equal P([Z]) (N=3)."""
    rng = np.random.default_rng(1)
    alpha, n, draws = 1.0, 3, 20000
    counts = Counter()
    for _ in range(draws):
        lof = left_ordered_form(sample_ibp(alpha, n, rng))
        counts[(lof.shape[1], lof.tobytes())] += 1
    checked = 0
    for (k, raw), count in counts.most_common(12):
        Z = np.frombuffer(raw, dtype=np.int8).reshape(n, k)
        p = math.exp(log_prob_lof(Z, alpha))
        _assert_mean(np.r_[np.ones(count), np.zeros(draws - count)], p,
                     math.sqrt(p * (1 - p) / draws), f"class {Z.tolist()}")
        checked += 1
    assert checked == 12


def test_left_ordered_form_and_class_probability_invariance():
    Z = np.array([[0, 1, 0, 1, 0],
                  [1, 1, 0, 0, 0],
                  [1, 0, 0, 1, 1]], dtype=np.int8)
    lof = left_ordered_form(Z)
    # columns as binary numbers, first row most significant, largest first; zero column dropped
    assert lof.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]]
    assert np.array_equal(left_ordered_form(lof), lof)
    perm = np.random.default_rng(2).permutation(Z.shape[1])
    assert log_prob_lof(Z[:, perm], 1.3) == pytest.approx(log_prob_lof(Z, 1.3))
    # two identical histories: class probability divides by K_h! = 2!
    twin = np.array([[1, 1], [0, 0]], dtype=np.int8)
    expected = 2 * math.log(1.3) - math.log(2) - 1.3 * harmonic(2) + 2 * math.log(0.5)
    assert log_prob_lof(twin, 1.3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="ordered by the row of their first 1"):
        log_prob_sequential(np.array([[0, 1], [1, 0]]), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        sample_ibp(0.0, 3, np.random.default_rng(0))


def test_stick_breaking_agrees_with_restaurant():
    rng = np.random.default_rng(3)
    alpha, n, draws, trunc = 2.0, 10, 4000, 80
    assert stick_breaking_missing_mass(alpha, n, trunc) < 1e-9
    k_sb = np.array([sample_stick_breaking(alpha, n, trunc, rng)[0].any(axis=0).sum()
                     for _ in range(draws)])
    k_rest = np.array([sample_ibp(alpha, n, rng).shape[1] for _ in range(draws)])
    lam = alpha * harmonic(n)
    _assert_mean(k_sb, lam, math.sqrt(lam / draws), "stick-breaking E[K+]")
    diff_se = math.sqrt(k_sb.var(ddof=1) / draws + k_rest.var(ddof=1) / draws)
    assert abs(k_sb.mean() - k_rest.mean()) <= Z_SCORE * diff_se
    Z, mu = sample_stick_breaking(alpha, n, trunc, rng)
    assert Z.shape == (n, trunc) and np.all(np.diff(mu) <= 0)


# ---------------------------------------------------------------------------- linear-Gaussian Gibbs
def test_collapsed_likelihood_matches_direct_gaussian():
    """P(X | Z) with A integrated out = prod_d N(x_d; 0, sigma_A^2 Z Z^T + sigma_X^2 I)."""
    rng = np.random.default_rng(4)
    Z = (rng.random((7, 3)) < 0.5).astype(float)
    X = rng.standard_normal((7, 4))
    sx, sa = 0.7, 1.6
    cov = sa ** 2 * Z @ Z.T + sx ** 2 * np.eye(7)
    direct = sum(stats.multivariate_normal(np.zeros(7), cov).logpdf(X[:, d]) for d in range(4))
    assert collapsed_log_likelihood(X, Z, sx, sa) == pytest.approx(direct, rel=1e-10)
    assert collapsed_log_likelihood(X, Z[:, :0], sx, sa) == pytest.approx(
        stats.norm(0, sx).logpdf(X).sum(), rel=1e-10)


def test_gibbs_without_likelihood_reproduces_ibp_moments():
    alpha, n = 2.0, 10
    sampler = LinearGaussianIBP(np.zeros((n, 1)), alpha=alpha, sample_alpha=False, likelihood=False,
                                seed=5)
    trace = sampler.run(3000)
    k_plus = trace.k_plus[200:].reshape(4, -1)  # four segments as pseudo-chains for the ESS
    mean, se = _mcmc_mean_se(k_plus)
    assert abs(mean - alpha * harmonic(n)) <= Z_SCORE * se, (mean, alpha * harmonic(n), se)


def _bars_data(rng, n=100, sigma_x=0.5):
    """The classic 6x6 four-feature images of Griffiths & Ghahramani (2005), one per quadrant."""
    A = np.zeros((4, 6, 6))
    A[0, 0, 1] = A[0, 1, 0] = A[0, 1, 1] = A[0, 1, 2] = A[0, 2, 1] = 1  # cross
    A[1, 0:3, 3:6] = 1
    A[1, 1, 4] = 0                                                     # ring
    A[2, 3:6, 0] = 1
    A[2, 5, 0:3] = 1                                                   # corner
    A[3, 3, 3] = A[3, 4, 4] = A[3, 5, 5] = 1                           # diagonal
    A = A.reshape(4, 36)
    Z = (rng.random((n, 4)) < 0.5).astype(float)
    return Z @ A + sigma_x * rng.standard_normal((n, 36)), A


def test_gibbs_recovers_four_latent_features():
    # seed 3 is one of the slower of seeds 0-9 to leave its 5-feature start (all ten reach 4)
    rng = np.random.default_rng(103)
    X, A = _bars_data(rng)
    sampler = LinearGaussianIBP(X, alpha=1.0, sigma_x=0.5, sigma_a=1.0, sample_sigma=False, seed=3)
    trace = sampler.run(400)
    kept = trace.k_plus[150:]
    assert np.bincount(kept).argmax() == 4, np.bincount(kept)
    if sampler.Z.shape[1] == 4:  # the learned images match the true ones up to order
        learned = sampler.posterior_mean_features()
        corr = np.corrcoef(np.vstack([A, learned]))[:4, 4:]
        assert np.all(corr.max(axis=1) > 0.9), corr


def test_gibbs_targets_the_exact_posterior_over_lof_classes():
    """N=3: class frequencies of the chain = P([Z]) P(X | Z) normalised over all classes (K+ <= 8)."""
    rng = np.random.default_rng(20)
    X = rng.normal(0.0, 1.0, (3, 2))
    alpha, sx, sa = 1.0, 0.7, 1.0
    classes, log_post = [], []
    for _, Z in _lof_classes(3, 8):
        classes.append((Z.shape[1], Z.tobytes()))
        log_post.append(log_prob_lof(Z, alpha) + collapsed_log_likelihood(X, Z, sx, sa))
    post = np.exp(np.array(log_post) - np.logaddexp.reduce(log_post))
    target = dict(zip(classes, post))
    sampler = LinearGaussianIBP(X, alpha=alpha, sigma_x=sx, sigma_a=sa, sample_alpha=False,
                                sample_sigma=False, k_new_max=8, seed=21)
    n_sweeps = 4000
    visited = []
    for _ in range(n_sweeps):
        sampler.sweep()
        lof = left_ordered_form(sampler.Z.astype(np.int8))
        visited.append((lof.shape[1], lof.tobytes()))
    visited = visited[500:]
    for key in sorted(target, key=target.get, reverse=True)[:6]:
        hits = np.array([v == key for v in visited], dtype=np.float64).reshape(4, -1)
        mean, se = _mcmc_mean_se(hits)
        assert abs(mean - target[key]) <= Z_SCORE * se + 1e-3, (key, mean, target[key], se)


def test_gibbs_samples_noise_level():
    rng = np.random.default_rng(8)
    X, _ = _bars_data(rng)
    sampler = LinearGaussianIBP(X, alpha=1.0, sigma_x=1.0, sigma_a=1.0, seed=9)
    trace = sampler.run(100)
    assert abs(np.median(trace.sigma_x[50:]) - 0.5) < 0.05


# ---------------------------------------------------------------------------- diagnostics
def test_rhat_and_ess_detect_what_they_should():
    rng = np.random.default_rng(10)
    iid = rng.standard_normal((4, 1000))
    assert split_rhat(iid) < 1.01
    assert abs(effective_sample_size(iid) / 4000 - 1) < 0.2
    rho = 0.9  # AR(1): ESS = n (1 - rho) / (1 + rho)
    ar = np.zeros((4, 4000))
    for t in range(1, 4000):
        ar[:, t] = rho * ar[:, t - 1] + rng.standard_normal(4)
    assert abs(effective_sample_size(ar) / (16000 * (1 - rho) / (1 + rho)) - 1) < 0.3
    shifted = iid + np.array([0.0, 0.0, 0.0, 2.0])[:, None]
    assert split_rhat(shifted) > 1.1
    assert split_rhat(np.array([[1.0] * 8, [2.0] * 8])) == np.inf
    assert split_rhat(np.ones((2, 8))) == 1.0


# ---------------------------------------------------------------------------- rank posterior
def test_rank_sampler_without_likelihood_is_the_finite_ibp():
    """sigma = inf: E[r_i] = alpha K / (K + alpha) and E[K+] = the finite-K formula (-> alpha H_N)."""
    alpha, n, k = 3.0, 12, 200
    sampler = IBPRankSampler(np.ones(n), sigma=math.inf, alpha=alpha, r_lo=0, r_hi=k,
                             truncation=k, n_chains=4, seed=11)
    post = sampler.run(1500, burn_in=100)
    moments = finite_prior_moments(alpha, n, k)
    mean, se = _mcmc_mean_se(post.ranks.mean(axis=2))
    assert abs(mean - moments["mean_rank"]) <= Z_SCORE * se, (mean, moments)
    mean, se = _mcmc_mean_se(post.k_plus)
    assert abs(mean - moments["mean_k_plus"]) <= Z_SCORE * se, (mean, moments)
    # the truncation is close to the IBP: within 3% of alpha H_N
    assert abs(moments["mean_k_plus"] / moments["mean_k_plus_ibp"] - 1) < 0.03


def test_rank_sampler_alpha_posterior_returns_gamma_prior_without_likelihood():
    """sigma = inf and alpha ~ Gamma(a, b): E[r] = E[alpha K / (K + alpha)], alpha's mean = a / b."""
    a, b, n, k = 40.0, 8.0, 10, 120
    sampler = IBPRankSampler(np.ones(n), sigma=math.inf, alpha_prior=(a, b), r_lo=0, r_hi=k,
                             truncation=k, n_chains=4, seed=12)
    post = sampler.run(1500, burn_in=100)
    expected, _ = integrate.quad(lambda x: x * k / (k + x) * stats.gamma.pdf(x, a, scale=1 / b), 0, 60)
    mean, se = _mcmc_mean_se(post.ranks.mean(axis=2))
    assert abs(mean - expected) <= Z_SCORE * se, (mean, expected, se)
    mean, se = _mcmc_mean_se(post.alpha)
    assert abs(mean - a / b) <= Z_SCORE * se, (mean, a / b, se)
    assert post.alpha_accept > 0.2


def test_large_sigma_returns_prior_mean_whatever_the_gaps():
    alpha, k = 5.0, 100
    gaps = np.exp(np.linspace(-3, 3, 8))
    sampler = IBPRankSampler(gaps, sigma=1e6, alpha=alpha, r_lo=0, r_hi=k, truncation=k,
                             n_chains=4, log_beta=-5.0, seed=13)
    post = sampler.run(800, burn_in=100)
    prior_mean = finite_prior_moments(alpha, 8, k)["mean_rank"]
    means, se = post.mean(), post.mcse()
    assert np.all(np.abs(means - prior_mean) <= Z_SCORE * se), (means, prior_mean, se)


def _run(gaps, seed, log_beta=-1.0, **kw):
    kw = {"sigma": 0.1, "r_lo": 0, "r_hi": 64, "n_chains": 4, **kw}
    return IBPRankSampler(gaps, log_beta=log_beta, seed=seed, **kw).run(400, burn_in=100)


def test_equal_gaps_give_equal_ranks():
    post = _run(np.full(10, 3.0), seed=14)
    means, se = post.mean(), post.mcse()
    for i, j in itertools.combinations(range(10), 2):
        assert abs(means[i] - means[j]) <= Z_SCORE * math.hypot(se[i], se[j]), (i, j, means)
    assert means.mean() > 3  # the likelihood moved the ranks: not a vacuous comparison of zeros
    assert post.diagnostics()["max_rhat"] < 1.05


def test_increasing_gaps_give_non_decreasing_ranks():
    post = _run(np.exp(np.linspace(0.0, 2.0, 10)), seed=15)
    means, se = post.mean(), post.mcse()
    for i in range(9):
        assert means[i + 1] >= means[i] - Z_SCORE * math.hypot(se[i], se[i + 1]), means
    assert means[-1] > means[0] + 5


def test_outlier_gap_gets_a_wider_interval_not_a_silent_extreme():
    gaps = np.r_[np.full(11, 2.0), 16.0]
    post = _run(gaps, seed=16)
    lo, hi = post.interval(0.9).T
    width = hi - lo
    assert width[-1] > 1.5 * width[:-1].max(), (lo, hi)
    # the prior pulls the outlier back: its mean is below the likelihood-only rank 16 / beta - 1
    likelihood_only = math.exp(math.log(16.0) - post.log_beta) - 1
    assert post.mean()[-1] < likelihood_only
    assert lo[-1] <= post.mean()[-1] <= hi[-1]


def test_calibrate_beta_meets_the_expected_budget():
    rng = np.random.default_rng(17)
    gaps = np.exp(rng.normal(0, 0.5, 30))
    costs = rng.integers(256, 4096, 30).astype(float)
    budget = 12.0 * costs.sum()
    sampler = IBPRankSampler(gaps, r_lo=0, r_hi=64, n_chains=4, seed=18)
    trace = calibrate_beta(sampler, costs, budget)
    assert abs(min(abs(t["rel_error"]) for t in trace)) <= 0.02
    post = sampler.run(200, burn_in=50)
    assert abs(post.expected_cost(costs) / budget - 1) < 0.05
    with pytest.raises(ValueError, match="outside the reachable range"):
        calibrate_beta(sampler, costs, 65.0 * costs.sum())


def test_sampler_rejects_bad_inputs():
    with pytest.raises(ValueError, match="entry 1"):
        IBPRankSampler([1.0, float("nan")])
    with pytest.raises(ValueError, match="entry 0"):
        IBPRankSampler([-1.0, 1.0])
    with pytest.raises(ValueError, match="at least one gap must be positive"):
        IBPRankSampler([0.0, 0.0])
    with pytest.raises(ValueError, match="r_lo"):
        IBPRankSampler([1.0], r_lo=5, r_hi=2)
    with pytest.raises(ValueError, match="truncation"):
        IBPRankSampler([1.0], r_hi=64, truncation=10)
