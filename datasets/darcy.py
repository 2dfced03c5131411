"""The Darcy-flow task: data from FNO's generator or FNO's .mat files.

Why two sources: the published files (``piececonst_r421_N1024_smooth{1,2}.mat``) are what ORCA
reports on, but they are 1.3 GB each and not always reachable, so ``source="generate"`` rebuilds
the same distribution with :mod:`datasets.darcy_solver` and caches it. Both paths end in the same
arrays: ``coeff`` and ``sol`` as float32 ``[N, s, s]`` (s = 85 for 421 subsampled by 5).

Splits (validation is never carved from the test set):

* ``mat``: train = smooth1[:n_train], val = smooth1[n_train:n_train + n_val], test = smooth2[:n_test].
  smooth1 holds 1024 samples, so with ORCA's n_train = 1000 at most 24 remain for validation.
* ``generate``: train = pool[:n_train], val = pool[n_train:n_train + n_val] of the "train" random
  stream; test = the "test" stream[:n_test], a different random stream, so no overlap is possible.

The model sees x = [unit-Gaussian-normalised a, x grid, y grid] and is trained on normalised u;
loss and metric are computed on decoded (physical) u, as ORCA and FNO do. The reader of FNO's files
is :mod:`datasets.darcy_mat`; the normaliser and the relative L2 are :mod:`datasets.field_regression`.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import darcy_solver
from datasets.darcy_solver import STREAMS, CoefficientPrior, darcy_stats  # noqa: F401  (re-exported)
from datasets.darcy_mat import FNO_TEST_FILE, FNO_TRAIN_FILE, load_darcy_mat
from datasets.errors import DataFileError
from datasets.field_regression import RelativeL2, UnitGaussianNormalizer
from datasets.progress import Progress
from datasets.registry import TaskData, register_task

# Bump when a change to darcy_solver changes the samples: it is part of the cache key.
GENERATOR_VERSION = "fno-grf-solve_gwf-v1"

PathLike = Union[str, os.PathLike]


def grid_size(resolution: int, subsample: int) -> int:
    """Side of the subsampled grid ``[::subsample]`` of a ``resolution`` grid (421, 5 -> 85)."""
    return (resolution - 1) // subsample + 1


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temp file in the same folder and ``os.replace`` it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_arrays(path: Path, coeff: np.ndarray, sol: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.savez(f, coeff=coeff, sol=sol))


# --------------------------------------------------------------------------------------------
# Generated data with a growing on-disk cache
# --------------------------------------------------------------------------------------------
def generator_params(
    seed: int = 0,
    resolution: int = 421,
    subsample: int = 5,
    prior: CoefficientPrior = CoefficientPrior(),
) -> dict:
    """Everything that determines the generated samples (and nothing else: not n, not workers)."""
    return {
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "resolution": int(resolution),
        "subsample": int(subsample),
        "a_high": float(prior.a_high),
        "a_low": float(prior.a_low),
        "alpha": float(prior.alpha),
        "tau": float(prior.tau),
    }


def cache_path(cache_root: PathLike, params: dict) -> Path:
    """Folder of one parameter set: a readable prefix plus a hash of all generating parameters."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    s = grid_size(params["resolution"], params["subsample"])
    return Path(cache_root) / f"r{params['resolution']}to{s}_seed{params['seed']}_{digest}"


def _read_cache(path: Path, s: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cached arrays, or empty ones when the file is absent or unusable (then it is regenerated)."""
    empty = np.zeros((0, s, s), np.float32)
    if not path.exists():
        return empty, empty.copy()
    try:
        with np.load(path) as z:
            coeff, sol = z["coeff"], z["sol"]
    except Exception as err:  # a foreign or truncated file: regenerating is always correct
        warnings.warn(f"ignoring unreadable Darcy cache {path} ({err}); regenerating")
        return empty, empty.copy()
    if coeff.shape != sol.shape or coeff.ndim != 3 or coeff.shape[1:] != (s, s) or coeff.dtype != np.float32:
        warnings.warn(f"ignoring Darcy cache {path} with shapes {coeff.shape}/{sol.shape}, expected [N, {s}, {s}]")
        return empty, empty.copy()
    return coeff, sol


def _mp_context():
    """fork where available, like torch's DataLoader: spawn would re-import torch in every worker
    (3+ s each). Workers only run numpy/scipy (OpenBLAS is fork-safe), never torch or OpenMP."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def generate_darcy(
    n: int,
    cache_root: PathLike,
    stream: str = "train",
    seed: int = 0,
    resolution: int = 421,
    subsample: int = 5,
    prior: CoefficientPrior = CoefficientPrior(),
    workers: Optional[int] = None,
    progress: bool = True,
    flush_every: int = 64,
) -> Tuple[np.ndarray, np.ndarray]:
    """Samples ``0..n-1`` of a stream, from the cache where present, generating only what is missing.

    The cache is ``cache_path(cache_root, params)/{stream}.npz`` with ``params.json`` beside it.
    It grows: asking for more samples generates only the missing indices, and partial progress
    is written every ``flush_every`` samples, so an interrupted run resumes where it stopped.

    Args:
        n: number of samples wanted.
        cache_root: folder holding all Darcy caches.
        stream: ``"train"`` (train/val pool) or ``"test"``.
        seed, resolution, subsample, prior: see :func:`darcy_solver.generate_sample`.
        workers: processes for generation (default ``os.cpu_count()``); 1 runs in this process.
        progress: report progress while generating (:class:`datasets.progress.Progress`).
        flush_every: samples between cache writes.

    Returns:
        coeff, sol: float32 ``[n, s, s]``.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    params = generator_params(seed, resolution, subsample, prior)
    folder = cache_path(cache_root, params)
    s = grid_size(resolution, subsample)
    path = folder / f"{stream}.npz"
    coeff, sol = _read_cache(path, s)
    if coeff.shape[0] >= n:
        return coeff[:n], sol[:n]

    meta = folder / "params.json"
    if not meta.exists():
        _atomic_write(meta, lambda f: f.write(json.dumps(params, indent=2, sort_keys=True).encode()))
    missing = range(coeff.shape[0], n)
    make = partial(
        darcy_solver.generate_sample, seed=seed, stream=stream, resolution=resolution, subsample=subsample,
        prior=prior,
    )
    workers = min(int(workers or os.cpu_count() or 1), len(missing))
    new_c, new_s = [coeff], [sol]
    done_since_flush = 0
    bar = Progress(total=len(missing), desc=f"darcy {stream} {resolution}->{s}", unit="sample", enabled=progress)

    def consume(results) -> None:
        nonlocal done_since_flush
        for c, u in results:
            new_c.append(c[None])
            new_s.append(u[None])
            bar.update(1)
            done_since_flush += 1
            if done_since_flush >= flush_every:
                _save_arrays(path, np.concatenate(new_c), np.concatenate(new_s))
                done_since_flush = 0

    try:
        if workers <= 1:
            consume(make(i) for i in missing)
        else:
            with ProcessPoolExecutor(workers, mp_context=_mp_context()) as ex:
                consume(ex.map(make, missing))
    finally:
        bar.close()
    coeff, sol = np.concatenate(new_c), np.concatenate(new_s)
    _save_arrays(path, coeff, sol)
    return coeff, sol


def check_darcy_arrays(coeff: np.ndarray, sol: np.ndarray, split: str) -> None:
    """Raise ValueError naming the split when arrays are not ``[N, s, s]`` pairs or hold NaN/inf."""
    coeff, sol = np.asarray(coeff), np.asarray(sol)
    if coeff.ndim != 3 or coeff.shape[1] != coeff.shape[2] or coeff.shape != sol.shape:
        raise ValueError(
            f"darcy {split} split: coeff {coeff.shape} and sol {sol.shape} must both be [N, s, s] of equal shape"
        )
    bad = ~(np.isfinite(coeff).reshape(len(coeff), -1).all(1) & np.isfinite(sol).reshape(len(sol), -1).all(1))
    if bad.any():
        raise ValueError(
            f"darcy {split} split: {int(bad.sum())} of {len(bad)} samples contain NaN or inf "
            f"(first at index {int(np.flatnonzero(bad)[0])})"
        )


def coordinate_grid(s: int) -> torch.Tensor:
    """``[2, s, s]``: x varies along columns, y along rows (ORCA's ``np.meshgrid`` 'xy' layout)."""
    t = torch.linspace(0.0, 1.0, s)
    return torch.stack([t[None, :].expand(s, s), t[:, None].expand(s, s)])


class DarcyDataset(Dataset):
    """Pairs ``x [3, s, s]`` = (normalised a, x grid, y grid) and ``y [s, s]`` = u in physical units.

    Args:
        coeff: ``[N, s, s]`` coefficients; sol: ``[N, s, s]`` solutions.
        a_normalizer: fitted on the training coefficients.
        split: name used in error messages.
    """

    def __init__(self, coeff: np.ndarray, sol: np.ndarray, a_normalizer: UnitGaussianNormalizer, split: str = "train"):
        check_darcy_arrays(coeff, sol, split)
        s = coeff.shape[1]
        if tuple(a_normalizer.mean.shape) != (s, s):
            fitted = tuple(a_normalizer.mean.shape)
            raise ValueError(f"darcy {split} split: grid {s}x{s} but the normalizer was fitted on {fitted}")
        with torch.no_grad():
            a = a_normalizer.encode(torch.as_tensor(coeff, dtype=torch.float32))
        self.x = torch.cat([a[:, None], coordinate_grid(s)[None].expand(len(a), 2, s, s)], dim=1).contiguous()
        self.y = torch.as_tensor(sol, dtype=torch.float32).contiguous()
        self.split = split

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


# --------------------------------------------------------------------------------------------
# Options and task
# --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class DarcyOptions:
    """Options of the ``darcy`` task (see the module docstring for how splits are carved)."""

    source: str = field(default="generate", metadata={"help": "'generate' (FNO's generator, cached) or 'mat'"})
    train_file: str = field(default=FNO_TRAIN_FILE, metadata={"help": "train/val .mat (source=mat), under the data root"})
    test_file: str = field(default=FNO_TEST_FILE, metadata={"help": "test .mat (source=mat), under the data root"})
    resolution: int = field(default=421, metadata={"help": "solver grid K (generate) or the files' grid size (mat)"})
    subsample: int = field(default=5, metadata={"help": "stride applied to the K x K fields: 421 / 5 -> 85x85"})
    n_train: int = field(default=1000, metadata={"help": "training samples (ORCA: 1000)"})
    n_val: int = field(default=100, metadata={"help": "validation samples after the training ones (mat: <= 1024 - n_train)"})
    n_test: int = field(default=100, metadata={"help": "test samples (ORCA: 100)"})
    a_high: float = field(default=CoefficientPrior.a_high, metadata={"help": "coefficient where the GRF >= 0"})
    a_low: float = field(default=CoefficientPrior.a_low, metadata={"help": "coefficient where the GRF < 0 (FNO data: 3; MATLAB demo: 4)"})
    alpha: float = field(default=CoefficientPrior.alpha, metadata={"help": "GRF covariance exponent"})
    tau: float = field(default=CoefficientPrior.tau, metadata={"help": "GRF inverse length scale"})
    seed: int = field(default=0, metadata={"help": "generator seed; sample i depends on (seed, stream, i) only"})
    workers: Optional[int] = field(default=None, metadata={"help": "generation processes (default: os.cpu_count())"})
    cache_dir: str = field(default="darcy", metadata={"help": "generated-data cache, relative to the data root"})

    def __post_init__(self):
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"DarcyOptions.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.source not in ("generate", "mat"):
            raise bad("source", "allowed values are 'generate' and 'mat'")
        for name in ("train_file", "test_file", "cache_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "must be a non-empty path string")
        if not _is_int(self.resolution) or self.resolution < 8:
            raise bad("resolution", "must be an int >= 8")
        if not _is_int(self.subsample) or not 1 <= self.subsample < self.resolution:
            raise bad("subsample", f"must be an int in [1, resolution={self.resolution})")
        if not _is_int(self.n_train) or self.n_train < 2:
            raise bad("n_train", "must be an int >= 2 (the normalizer needs an unbiased std)")
        for name in ("n_val", "n_test"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an int >= 1")
        for name in ("a_high", "a_low", "tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "must be a finite number > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise bad("alpha", "must be a number > 0")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "must be an int >= 0")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 1):
            raise bad("workers", "must be None (all cores) or an int >= 1")

    @property
    def grid(self) -> int:
        return grid_size(self.resolution, self.subsample)

    @property
    def prior(self) -> CoefficientPrior:
        """The generator's coefficient law these options ask for."""
        return CoefficientPrior(a_high=self.a_high, a_low=self.a_low, alpha=self.alpha, tau=self.tau)


def _resolve(data_root: PathLike, p: str) -> Path:
    return Path(p) if os.path.isabs(p) else Path(data_root) / p


def load_darcy_splits(opts: DarcyOptions, data_root: PathLike, progress: bool = True) -> dict:
    """``{"train"|"val"|"test": (coeff, sol)}`` float32 ``[N, s, s]`` as the options describe."""
    n_pool = opts.n_train + opts.n_val
    if opts.source == "mat":
        train_path = _resolve(data_root, opts.train_file)
        coeff, sol = load_darcy_mat(train_path, None, opts.resolution, opts.subsample)
        if len(coeff) < n_pool:
            raise DataFileError(
                f"the file holds {len(coeff)} samples but n_train + n_val = {opts.n_train} + {opts.n_val} = {n_pool} "
                f"(validation is carved after the training samples of this file, never from the test file)",
                str(train_path), f"lower n_val (<= {max(len(coeff) - opts.n_train, 0)}) or n_train",
            )
        coeff, sol = coeff[:n_pool], sol[:n_pool]
        test = load_darcy_mat(_resolve(data_root, opts.test_file), opts.n_test, opts.resolution, opts.subsample)
    else:
        kw = dict(
            cache_root=_resolve(data_root, opts.cache_dir), seed=opts.seed, resolution=opts.resolution,
            subsample=opts.subsample, prior=opts.prior, workers=opts.workers, progress=progress,
        )
        coeff, sol = generate_darcy(n_pool, stream="train", **kw)
        test = generate_darcy(opts.n_test, stream="test", **kw)
    return {
        "train": (coeff[: opts.n_train], sol[: opts.n_train]),
        "val": (coeff[opts.n_train : n_pool], sol[opts.n_train : n_pool]),
        "test": test,
    }


@register_task("darcy", DarcyOptions, "Darcy flow 421->85 (FNO data or generator), relative L2")
def build_darcy(opts: DarcyOptions, data_root: str) -> TaskData:
    """Darcy flow: x = [normalised a, x, y] ``[3, s, s]``, y = u ``[s, s]``, metric relative L2.

    The model predicts normalised u; ``TaskData.decode`` (the u-normalizer's inverse) maps it to
    physical units, and ``loss`` decodes internally, so both loss and metric are on physical u.
    Normalizers are fitted on the training split only.
    """
    splits = load_darcy_splits(opts, data_root)
    for name, (c, u) in splits.items():
        check_darcy_arrays(c, u, name)
    s = splits["train"][0].shape[1]
    a_norm = UnitGaussianNormalizer((s, s)).fit(splits["train"][0])
    u_norm = UnitGaussianNormalizer((s, s)).fit(splits["train"][1])
    decode = u_norm.inverse()
    data = {name: DarcyDataset(c, u, a_norm, name) for name, (c, u) in splits.items()}
    info = {
        **asdict(opts),
        "grid": s,
        "sizes": {k: len(v) for k, v in data.items()},
        "val_from": "train file after n_train" if opts.source == "mat" else "train stream after n_train",
    }
    return TaskData(
        train=data["train"],
        val=data["val"],
        test=data["test"],
        in_channels=3,
        kind="dense",
        out_shape=(s, s),
        loss=RelativeL2("sum", decode=decode),
        metric=RelativeL2("none"),
        metric_name="rel_l2",
        decode=decode,
        info=info,
    )
