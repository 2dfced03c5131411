"""Delta W spectra: how low-rank a fine-tuning update is, and the file stage 3 keeps it in.

The rank-gap hypothesis (``scripts/hypothesis.py``, analysis (c)) correlates each block's gap with
the effective rank of its update Delta W = W_ft - W_0. Checkpoints (50-350 MB) are not kept; the
singular values are (a few hundred kB for Swin-B), and any energy threshold or the stable rank
follows from them later. Stage 3 writes them (``orca.delta_w``), the analysis reads them; both use
this module, which needs numpy only.

- :func:`effective_rank_energy`, :func:`stable_rank`, :func:`delta_w_ranks`: ranks of a matrix;
  :func:`delta_w_spectra` keeps only the singular values and :func:`spectrum_ranks` gives the same
  ranks from them (the matrix functions call the spectrum functions: one implementation).
- :data:`DELTA_W_FILE`: gzipped JSON. The singular values of every body Linear are ~140 kB of
  decimal digits per full fine-tuning run, and run directories are committed, so they weigh on
  every clone. Compressed they take 40%; the content is the same JSON (``zcat delta_w.json.gz``).
  Older run directories hold a plain ``delta_w.json``, which the reader still takes.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

import numpy as np

from orca.errors import reading

DELTA_W_FILE = "delta_w.json.gz"
LEGACY_DELTA_W_FILE = "delta_w.json"  # uncompressed, written by older versions


def encode_spectra(text: str) -> bytes:
    """``text`` (the JSON document) gzipped with a zero timestamp, so equal spectra give equal bytes."""
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def find_spectra(run_dir: Path) -> Optional[Path]:
    """The run's spectra file, compressed or legacy, or None when it has neither."""
    for name in (DELTA_W_FILE, LEGACY_DELTA_W_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def read_spectra(path: Path) -> Dict[str, Any]:
    """The JSON document of a ``delta_w.json.gz`` or a legacy ``delta_w.json``.

    Raises:
        FileReadError: the file is neither valid gzip-compressed JSON nor valid JSON, naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    with reading(path, "a Delta W spectra file", "rerun the stage-3 run that wrote it, or move the file aside"):
        text = gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8")
        return json.loads(text)


# ----------------------------------------------------------------------------- ranks from a matrix or its spectrum
SPECTRUM_DIGITS = 7  # significant digits of the stored singular values (float32 carries ~7)


def _singular_values(delta_w: Any) -> np.ndarray:
    w = _as_array(delta_w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("matrix has non-finite entries")
    return np.linalg.svd(w, compute_uv=False)


def _spectrum(s: Any) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"a spectrum is a 1-D array of singular values, got shape {s.shape}")
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise ValueError("singular values must be finite and >= 0")
    return np.sort(s)[::-1]


def energy_rank_from_spectrum(s: Any, energy: float = 0.9) -> int:
    """Smallest k whose top-k squared singular values hold ``energy`` of sum_k s_k^2 (0 for an all-zero
    spectrum); the one implementation behind :func:`effective_rank_energy`.

    Args:
        s: singular values (any order; e.g. the stored spectra of :func:`delta_w_spectra`).
        energy: fraction in (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be in (0, 1]")
    s2 = _spectrum(s) ** 2
    total = s2.sum()
    if total == 0:
        return 0
    cum = np.cumsum(s2) / total
    return int(np.searchsorted(cum, energy * (1 - 1e-12)) + 1)


def stable_rank_from_spectrum(s: Any) -> float:
    """sum_k s_k^2 / s_1^2 (0.0 for an empty or all-zero spectrum); the one implementation behind
    :func:`stable_rank`."""
    s = _spectrum(s)
    return float((s ** 2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def spectrum_ranks(s: Any, energy: float = 0.9) -> Dict[str, float]:
    """``{"energy_rank", "stable_rank", "fro", "max_rank"}`` of a matrix given by its full spectrum ``s``
    (min(d_out, d_in) values): equal to :func:`delta_w_ranks`' entry for the matrix itself."""
    s = _spectrum(s)
    return {"energy_rank": energy_rank_from_spectrum(s, energy), "stable_rank": stable_rank_from_spectrum(s),
            "fro": float(np.sqrt((s ** 2).sum())), "max_rank": int(s.size)}


def effective_rank_energy(delta_w: Any, energy: float = 0.9) -> int:
    """Smallest k whose top-k squared singular values hold ``energy`` of ||Delta W||_F^2 (0 for a zero matrix).

    Args:
        delta_w: (d_out, d_in) array or tensor.
        energy: fraction in (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be in (0, 1]")
    return energy_rank_from_spectrum(_singular_values(delta_w), energy)


def stable_rank(delta_w: Any) -> float:
    """||Delta W||_F^2 / ||Delta W||_2^2 = sum_k s_k^2 / s_1^2 (0.0 for a zero matrix)."""
    return stable_rank_from_spectrum(_singular_values(delta_w))


def _weight_pairs(base_state: Mapping[str, Any], finetuned_state: Mapping[str, Any],
                  layer_names: Optional[Iterable[str]], who: str) -> Iterator[tuple]:
    """(name, W_0, W_ft) as float64 arrays for each Linear ``name`` (``{name}.weight`` keys)."""
    if layer_names is None:
        layer_names = [k[: -len(".weight")] for k, v in base_state.items()
                       if k.endswith(".weight") and k in finetuned_state and getattr(v, "ndim", 0) == 2]
    for name in layer_names:
        key = f"{name}.weight"
        if key not in base_state or key not in finetuned_state:
            raise ValueError(f"{who}: {key!r} missing from the "
                             f"{'base' if key not in base_state else 'fine-tuned'} state dict")
        w0, w1 = _as_array(base_state[key]), _as_array(finetuned_state[key])
        if w0.shape != w1.shape or w0.ndim != 2:
            raise ValueError(f"{who}: {key!r} has shapes {w0.shape} vs {w1.shape}; need equal 2-D")
        yield name, w0, w1


def delta_w_ranks(base_state: Mapping[str, Any], finetuned_state: Mapping[str, Any],
                  layer_names: Optional[Iterable[str]] = None, energy: float = 0.9) -> Dict[str, Dict[str, float]]:
    """Effective ranks of the update Delta W = W_ft - W_0 of each Linear.

    Args:
        base_state, finetuned_state: state dicts (initial body, full fine-tuning checkpoint) with
            ``{name}.weight`` keys.
        layer_names: Linear module names; None = every 2-D ``*.weight`` present in both.
        energy: the energy fraction of :func:`effective_rank_energy`.

    Returns:
        ``{name: {"energy_rank", "stable_rank", "fro", "max_rank"}}`` in ``layer_names`` order.
    """
    out: Dict[str, Dict[str, float]] = {}
    for name, w0, w1 in _weight_pairs(base_state, finetuned_state, layer_names, "delta_w_ranks"):
        d = w1 - w0
        out[name] = {"energy_rank": effective_rank_energy(d, energy), "stable_rank": stable_rank(d),
                     "fro": float(np.linalg.norm(d)), "max_rank": int(min(d.shape))}
    return out


def delta_w_spectra(base_state: Mapping[str, Any], finetuned_state: Mapping[str, Any],
                    layer_names: Optional[Iterable[str]] = None,
                    digits: int = SPECTRUM_DIGITS) -> Dict[str, Dict[str, Any]]:
    """The spectrum of each Linear's update Delta W = W_ft - W_0, small enough to keep instead of
    the checkpoints (what stage 3 writes to ``delta_w.json.gz``).

    Args:
        base_state, finetuned_state, layer_names: as :func:`delta_w_ranks`.
        digits: significant digits the singular values are rounded to.

    Returns:
        ``{name: {"shape": [d_out, d_in], "w0_fro": ||W_0||_F, "s": [s_1 >= s_2 >= ...]}}`` (float64
        SVD; ``min(shape)`` values; JSON-ready). :func:`spectrum_ranks` of ``s`` gives the ranks
        :func:`delta_w_ranks` gives, up to the rounding.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for name, w0, w1 in _weight_pairs(base_state, finetuned_state, layer_names, "delta_w_spectra"):
        d = w1 - w0
        if not np.isfinite(d).all():
            raise ValueError(f"delta_w_spectra: {name!r}: Delta W has non-finite entries")
        s = np.linalg.svd(d, compute_uv=False)
        out[name] = {"shape": list(d.shape), "w0_fro": _round(float(np.linalg.norm(w0)), digits),
                     "s": [_round(float(v), digits) for v in s]}
    return out


def _round(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def _as_array(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)
