"""Convergence diagnostics of MCMC draws from several chains: split R-hat and effective sample size.

Why here: they read only arrays of draws, so every sampler in the package (and its tests) can use
the same estimators as Stan (Gelman et al., BDA3 Sec. 11.4-11.5).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["split_rhat", "effective_sample_size"]


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
