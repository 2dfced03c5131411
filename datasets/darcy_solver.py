"""FNO's Darcy-flow generator (``GRF.m`` + ``solve_gwf.m``) transcribed to numpy/scipy.

Why a transcription and not a "clean" solver: ORCA's and FNO's numbers are on the published
arrays, so our samples must come from the same distribution, including two details that look
like accidents but move u by more than ORCA's whole error (results/reference/darcy_stats.json):

* the data live on **cell centres** ``(i + 1/2) / K`` while the PDE is solved on **nodes**
  ``linspace(0, 1, K)``; both moves are not-a-knot cubic splines (MATLAB ``interp2(..., 'spline')``),
  which is why published solutions are small but nonzero on the boundary cells;
* the solve happens at K = 421 and only then is subsampled ``[::5, ::5]`` to 85x85 (solving at 85
  directly changes u by about 2% relative L2).

The solve is exact (direct elimination, no iteration; :mod:`datasets.multifrontal`) and checked
by its residual.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from scipy.fft import idctn
from scipy.interpolate import CubicSpline
from threadpoolctl import threadpool_limits

from datasets.multifrontal import solve_interior

# Stream ids keep the train/val pool and the test set in different random streams, so no test
# sample can ever equal a training sample, whatever n_train/n_val/n_test are.
STREAMS: Dict[str, int] = {"train": 0, "test": 1}


# --------------------------------------------------------------------------------------------
# Random coefficient (GRF.m)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoefficientPrior:
    """The law of the permeability a(x): a GRF (``alpha``, ``tau``) thresholded at 0 to ``a_high`` /
    ``a_low``. The defaults are FNO's data (Li et al. 2021), the one place they are written: the
    generator's functions take a prior, and the ``darcy`` task's options default to these fields."""

    a_high: float = 12.0  # where the GRF >= 0
    a_low: float = 3.0  # where the GRF < 0 (FNO data: 3; the MATLAB demo: 4)
    alpha: float = 2.0  # GRF covariance exponent
    tau: float = 3.0  # GRF inverse length scale

    def sample(self, rng: np.random.Generator, s: int) -> np.ndarray:
        """One ``[s, s]`` coefficient field: :func:`threshold_coefficient` of :func:`sample_grf`."""
        return threshold_coefficient(sample_grf(rng, s, self.alpha, self.tau), self.a_high, self.a_low)


def sample_grf(rng: np.random.Generator, s: int, alpha: float, tau: float) -> np.ndarray:
    """Draw a Gaussian random field with covariance ~ (-Laplacian + tau^2 I)^-alpha (Neumann BCs).

    Follows GRF.m: KL coefficients in the cosine basis, the constant mode dropped, then an
    orthonormal inverse DCT-II onto the s x s cell centres. The tau^(alpha-1) * s scale is kept
    so values match MATLAB's even though only the sign is used downstream.

    Args:
        rng: numpy generator; the field uses exactly ``s*s`` standard normals from it.
        s: grid size.
        alpha, tau: covariance smoothness and inverse length scale.

    Returns:
        g: ``[s, s]`` float64 field on cell centres.
    """
    xi = rng.standard_normal((s, s))
    k = np.arange(s, dtype=np.float64)
    coef = tau ** (alpha - 1) * (np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + tau**2) ** (-alpha / 2)
    kl = s * coef * xi
    kl[0, 0] = 0.0
    return idctn(kl, type=2, norm="ortho")


def threshold_coefficient(g: np.ndarray, a_high: float, a_low: float) -> np.ndarray:
    """Piecewise-constant permeability: ``a_high`` where ``g >= 0``, ``a_low`` elsewhere.

    Args:
        g: ``[s, s]`` Gaussian random field.
        a_high, a_low: the two coefficient values (:class:`CoefficientPrior`).

    Returns:
        a: ``[s, s]`` float64.
    """
    return np.where(g >= 0, float(a_high), float(a_low))


# --------------------------------------------------------------------------------------------
# Solver (solve_gwf.m)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def spline_matrices(K: int) -> Tuple[np.ndarray, np.ndarray]:
    """Linear maps cell centres -> nodes and nodes -> cell centres (not-a-knot cubic spline).

    A 1D spline is linear in the data, so applying it to the identity gives its matrix; the
    tensor-product 2D spline of MATLAB's ``interp2(..., 'spline')`` is then ``M @ F @ M.T``.
    Node 0 and node K-1 lie half a cell outside the centres: the end cubic pieces extrapolate,
    exactly as MATLAB's ``spline`` does.

    Args:
        K: grid size (number of cells = number of nodes).

    Returns:
        to_nodes: ``[K, K]``; to_centres: ``[K, K]``.
    """
    centres = (np.arange(K) + 0.5) / K
    nodes = np.linspace(0.0, 1.0, K)
    eye = np.eye(K)
    to_nodes = CubicSpline(centres, eye, axis=0, bc_type="not-a-knot")(nodes)
    to_centres = CubicSpline(nodes, eye, axis=0, bc_type="not-a-knot")(centres)
    return np.ascontiguousarray(to_nodes), np.ascontiguousarray(to_centres)


@functools.lru_cache(maxsize=8)
def _unit_forcing_on_nodes(K: int) -> np.ndarray:
    """f = 1 splined to the nodes (what :func:`solve_darcy` does with ``forcing=None``), read-only."""
    to_nodes, _ = spline_matrices(K)
    f = to_nodes @ np.ones((K, K)) @ to_nodes.T
    f.flags.writeable = False
    return f


def solve_darcy(coeff: np.ndarray, forcing: Optional[np.ndarray] = None) -> np.ndarray:
    """Solve -div(a grad u) = f, u = 0 on the boundary of (0,1)^2, like FNO's solve_gwf.m.

    Args:
        coeff: ``[K, K]`` coefficient on cell centres ``(i + 1/2) / K``.
        forcing: ``[K, K]`` right-hand side on cell centres; ``None`` means f = 1.

    Returns:
        u: ``[K, K]`` float64 solution on the cell centres.
    """
    coeff = np.asarray(coeff, dtype=np.float64)
    if coeff.ndim != 2 or coeff.shape[0] != coeff.shape[1] or coeff.shape[0] < 5:
        raise ValueError(f"solve_darcy: coeff must be a square [K, K] array with K >= 5, got shape {coeff.shape}")
    K = coeff.shape[0]
    if forcing is not None and np.shape(forcing) != (K, K):
        raise ValueError(f"solve_darcy: forcing shape {np.shape(forcing)} must equal coeff shape {(K, K)}")
    # One BLAS thread: thousands of small dense solves and products are slower threaded, and badly
    # so when generate_darcy's worker processes already fill the cores (3.6 s instead of 0.7 s per
    # 421 sample with 2 workers on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        to_nodes, to_centres = spline_matrices(K)
        coef_nodes = to_nodes @ coeff @ to_nodes.T
        if forcing is None:
            f_nodes = _unit_forcing_on_nodes(K)
        else:
            f_nodes = to_nodes @ np.asarray(forcing, dtype=np.float64) @ to_nodes.T
        u_nodes = np.zeros((K, K))
        u_nodes[1:-1, 1:-1] = solve_interior(coef_nodes, f_nodes[1:-1, 1:-1])
        return to_centres @ u_nodes @ to_centres.T


# --------------------------------------------------------------------------------------------
# One sample, reproducible from (seed, stream, index) alone
# --------------------------------------------------------------------------------------------
def generate_sample(
    index: int,
    seed: int = 0,
    stream: str = "train",
    resolution: int = 421,
    subsample: int = 5,
    prior: CoefficientPrior = CoefficientPrior(),
) -> Tuple[np.ndarray, np.ndarray]:
    """Generate Darcy sample ``index`` of a stream; independent of any other sample or worker.

    The generator is ``np.random.default_rng([seed, STREAMS[stream], index])``, so a sample is
    the same whether made alone, in a batch, in any process, or after the cache grew.

    Args:
        index: sample index (>= 0) within the stream.
        seed: base seed (>= 0).
        stream: ``"train"`` (train + val pool) or ``"test"``.
        resolution: solver grid K (421 for FNO's data).
        subsample: stride of the returned grid, ``[::subsample, ::subsample]``.
        prior: the law of the coefficient (default: FNO's).

    Returns:
        coeff, sol: ``[s, s]`` float32 each, ``s = (resolution - 1) // subsample + 1``.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    rng = np.random.default_rng([int(seed), STREAMS[stream], int(index)])
    a = prior.sample(rng, resolution)
    u = solve_darcy(a)
    sl = slice(None, None, subsample)
    return a[sl, sl].astype(np.float32), u[sl, sl].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Statistics (reference/darcy_stats.json)
# --------------------------------------------------------------------------------------------
QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)  # min, p05, median, p95, max as in darcy_stats.json


def darcy_stats(coeff: np.ndarray, sol: np.ndarray, a_high: float = CoefficientPrior.a_high) -> dict:
    """The quantities of reference/darcy_stats.json, to check a generator or a loaded file.

    Args:
        coeff: ``[N, s, s]`` coefficients (values a_high / a_low).
        sol: ``[N, s, s]`` solutions.
        a_high: the high coefficient value whose pixel fraction is reported.

    Returns:
        dict with ``max_u``, ``mean_u``, ``l2_norm_u_flattened``, ``fraction_of_pixels_with_a_high``
        as ``[min, p05, median, p95, max]`` over samples, ``per_sample`` (the ``[N]`` arrays),
        ``u_nonnegative``, ``overall_std_u`` and ``n_samples``.
    """
    coeff = np.asarray(coeff, dtype=np.float64)
    sol = np.asarray(sol, dtype=np.float64)
    if sol.ndim != 3 or coeff.shape != sol.shape:
        raise ValueError(f"darcy_stats needs coeff and sol of equal shape [N, s, s], got {coeff.shape} and {sol.shape}")
    flat = sol.reshape(sol.shape[0], -1)
    per_sample = {
        "max_u": flat.max(axis=1),
        "mean_u": flat.mean(axis=1),
        "l2_norm_u_flattened": np.linalg.norm(flat, axis=1),
        "fraction_of_pixels_with_a_high": np.isclose(coeff, a_high).reshape(coeff.shape[0], -1).mean(axis=1),
    }
    out = {k: [float(q) for q in np.quantile(v, QUANTILES)] for k, v in per_sample.items()}
    out.update(
        per_sample=per_sample,
        n_samples=int(sol.shape[0]),
        u_nonnegative=bool(np.all(sol >= 0)),
        overall_std_u=float(sol.std()),
    )
    return out
