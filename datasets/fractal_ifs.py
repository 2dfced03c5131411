"""Iterated function systems, the classes of the FractalDB-style data: affine maps, their selection
probabilities, and how an instance perturbs its class (FractalDB, Sec. 3).

A class is an IFS of M in [2, 8] affine maps ``w_i(x, y) = (a x + b y + e, c x + d y + f)`` with
(a..f) ~ U(-1, 1), picked with probability ``p_i ~ |det A_i|``. Only contractive maps (largest
singular value < ``MAX_SIGMA``) are kept, so the attractor is bounded and a chain started at a map's
fixed point never leaves it. An instance is its class perturbed: Gaussian noise on every parameter
plus FractalDB's "weighting" of one parameter by w in {0.8, 0.9, 1.0, 1.1, 1.2}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_MAPS = 2
MAX_MAPS = 8
MAX_SIGMA = 0.95  # largest singular value allowed per map; < 1 keeps the attractor bounded
PARAM_RANGE = 1.0  # FractalDB samples every map parameter from U(-1, 1)
FRACTALDB_WEIGHTS = (0.8, 0.9, 1.0, 1.1, 1.2)


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _sigma_max(maps: np.ndarray) -> np.ndarray:
    """Largest singular value of each map's linear part.

    Args:
        maps: ``[M, 6]`` rows (a, b, c, d, e, f).
    Returns:
        ``[M]``.
    """
    lin = maps[:, :4].reshape(-1, 2, 2)
    return np.linalg.svd(lin, compute_uv=False)[:, 0]


@dataclass(frozen=True)
class IFS:
    """An iterated function system: M affine maps and their selection probabilities.

    Attributes:
        maps: ``[M, 6]`` float64 rows (a, b, c, d, e, f) of ``(x, y) -> (a x + b y + e, c x + d y + f)``.
        probs: ``[M]`` probabilities, proportional to ``|det A_i|`` (FractalDB), summing to 1.
    """

    maps: np.ndarray
    probs: np.ndarray

    @classmethod
    def from_maps(cls, maps: np.ndarray) -> "IFS":
        """Build an IFS with FractalDB's probabilities ``p_i ~ |a_i d_i - b_i c_i|``.

        Args:
            maps: ``[M, 6]`` with ``MIN_MAPS <= M <= MAX_MAPS``.
        """
        maps = np.asarray(maps, dtype=np.float64)
        if maps.ndim != 2 or maps.shape[1] != 6 or not MIN_MAPS <= maps.shape[0] <= MAX_MAPS:
            raise ValueError(f"IFS maps must have shape [M, 6] with {MIN_MAPS} <= M <= {MAX_MAPS}, got {maps.shape}")
        # A tiny floor keeps a singular map selectable and avoids 0/0 when all dets vanish.
        det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2]) + 1e-12
        return cls(maps=maps, probs=det / det.sum())

    @property
    def num_maps(self) -> int:
        return int(self.maps.shape[0])

    def fixed_point(self, i: int = 0) -> np.ndarray:
        """Fixed point ``(I - A_i)^-1 t_i`` of map ``i``: a point on the attractor, so chains need no
        burn-in to reach it (only to forget it)."""
        a, b, c, d, e, f = self.maps[i]
        return np.linalg.solve(np.array([[1 - a, -b], [-c, 1 - d]]), np.array([e, f]))


def sample_contractive_map(rng: np.random.Generator) -> np.ndarray:
    """FractalDB's U(-1, 1) map, conditioned on being contractive by rejection.

    Why rejection rather than rescaling: it keeps FractalDB's parameter distribution (restricted to
    the contractive set), whose shapes the filling filter was designed around.
    """
    while True:
        m = rng.uniform(-PARAM_RANGE, PARAM_RANGE, size=6)
        if _sigma_max(m[None])[0] < MAX_SIGMA:
            return m


def perturb_ifs(ifs: IFS, rng: np.random.Generator, noise_std: float = 0.05,
                weights: Sequence[float] = FRACTALDB_WEIGHTS) -> IFS:
    """One instance of a class: parameter noise plus FractalDB's one-parameter weighting.

    Why both: FractalDB's weighting alone gives only 6 x M x |weights| distinct instances; the noise
    makes every instance distinct while staying visibly the same shape. Maps pushed past
    ``MAX_SIGMA`` have their linear part scaled back, so instances stay bounded.

    Args:
        ifs: the class system.
        rng: the instance's generator (consumed: 3 + 6M draws).
        noise_std: std of the additive Gaussian noise on each of the 6M parameters.
        weights: FractalDB weights; one, chosen uniformly, multiplies one random parameter.
    """
    maps = ifs.maps + rng.normal(0.0, noise_std, size=ifs.maps.shape)
    i, j = int(rng.integers(ifs.num_maps)), int(rng.integers(6))
    maps[i, j] *= float(weights[int(rng.integers(len(weights)))])
    scale = np.minimum(1.0, MAX_SIGMA / np.maximum(_sigma_max(maps), 1e-12))
    maps[:, :4] *= scale[:, None]
    return IFS.from_maps(maps)
