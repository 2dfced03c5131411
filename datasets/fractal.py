"""FractalDB-style formula-driven source data: IFS classes rendered by the chaos game.

Why fractals: Kataoka et al. ("Pre-training without Natural Images", ACCV 2020) showed that
classifying iterated-function-system (IFS) attractors pretrains vision transformers with no natural
image at all. That gives orca-rank three things that need no download: a source body (pretrain on
``fractal``), a labelled source set for stage 1's OTDD when CIFAR-10 is absent, and a small-gap
target task (``fractal_heldout``: classes of the same generator that pretraining never saw).

The recipe (FractalDB, Sec. 3), with the choices this module makes:

1. A class is an IFS of M in [2, 8] affine maps ``w_i(x, y) = (a x + b y + e, c x + d y + f)`` with
   (a..f) ~ U(-1, 1), picked with probability ``p_i ~ |det A_i|``. We keep only contractive maps
   (largest singular value < ``MAX_SIGMA``) so the attractor is bounded and a chain started at a
   map's fixed point never leaves it; FractalDB's filling-ratio filter then rejects systems whose
   coarse render covers less than ``fill_threshold`` of the image (thin lines, single dots).
2. An instance is its class perturbed: Gaussian noise on every parameter plus FractalDB's
   "weighting" of one parameter by w in {0.8, 0.9, 1.0, 1.1, 1.2}.
3. Rendering runs many chaos-game chains in parallel (vectorised over instances and chains), fits
   the points' bounding box to the image (each axis independently, as FractalDB does) and counts
   points per pixel with ``bincount``; optional k x k splatting (FractalDB's patch rendering), binary
   or log-density intensity, grayscale or one colour per instance.

Determinism: every random number of an image comes from (seed, class, instance) alone. Parameters
are drawn on the CPU from ``np.random.default_rng([seed, class, instance])``; the chaos game's map
sequence comes from an integer counter hash evaluated on the render device. Integer hashing, integer
pixel counts and single IEEE-rounded float elementwise ops (no fused or reduced float arithmetic)
make an image the same whichever batch renders it, and on CPU or GPU.

Class-id convention: pretraining uses classes ``[0, num_classes)`` with ``num_classes <=
HELDOUT_CLASS_OFFSET``; held-out target classes start at ``HELDOUT_CLASS_OFFSET`` (10000), so the two
sets are disjoint by construction for any seed.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.images import (
    ClassificationSplits,
    classification_task_data,
    normalize_uint8,
    random_resized_crop_flip,
)
from datasets.registry import TaskData, register_task

MIN_MAPS = 2
MAX_MAPS = 8
MAX_SIGMA = 0.95  # largest singular value allowed per map; < 1 keeps the attractor bounded
PARAM_RANGE = 1.0  # FractalDB samples every map parameter from U(-1, 1)
FRACTALDB_WEIGHTS = (0.8, 0.9, 1.0, 1.1, 1.2)
HELDOUT_CLASS_OFFSET = 10_000
RENDER_MODES = ("binary", "density")

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1  # odd constant spreading consecutive counters over 32 bits
_HASH_MULT = 0x45D9F3B  # < 2**31, so products of 32-bit values fit in int64 without overflow


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value: int, minimum: int) -> None:
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


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash (xor-shift-multiply), exact on any device.

    Why not torch.Generator: a generator per instance cannot be vectorised over a batch, and the
    stream of a shared one depends on batch composition. A counter hash gives each (instance, point)
    its own random bits in one tensor op, bit-identical on CPU and GPU.

    Args:
        x: int64 tensor with values in ``[0, 2**32)``.
    """
    x = x ^ (x >> 16)
    x = (x * _HASH_MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULT) & _MASK32
    x = x ^ (x >> 16)
    return x


# ----------------------------------------------------------------------------------------------
# IFS sampling and perturbation
# ----------------------------------------------------------------------------------------------
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


def _sample_contractive_map(rng: np.random.Generator) -> np.ndarray:
    """FractalDB's U(-1, 1) map, conditioned on being contractive by rejection.

    Why rejection rather than rescaling: it keeps FractalDB's parameter distribution (restricted to
    the contractive set), whose shapes the filling filter was designed around.
    """
    while True:
        m = rng.uniform(-PARAM_RANGE, PARAM_RANGE, size=6)
        if _sigma_max(m[None])[0] < MAX_SIGMA:
            return m


@functools.lru_cache(maxsize=65536)
def sample_class_ifs(seed: int, class_id: int, fill_threshold: float = 0.1, fill_size: int = 32,
                     fill_points: int = 4000, max_tries: int = 1000) -> IFS:
    """The IFS of one class: random contractive maps that pass the filling-ratio filter.

    Deterministic from (seed, class_id): the same class is the same system in every process.

    Args:
        seed: generator seed (>= 0).
        class_id: class index (>= 0).
        fill_threshold: minimum fraction of pixels covered by a ``fill_size`` binary render with
            ``fill_points`` points; 0 disables the filter.
        fill_size, fill_points: resolution and point count of that coarse render.
        max_tries: candidate systems tried before giving up.
    Returns:
        The class's :class:`IFS`.
    """
    _check_int("seed", seed, 0)
    _check_int("class_id", class_id, 0)
    if not 0.0 <= fill_threshold < 1.0:
        raise ValueError(f"fill_threshold must be in [0, 1), got {fill_threshold!r}")
    rng = np.random.default_rng([int(seed), int(class_id)])
    for _ in range(max_tries):
        m = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
        ifs = IFS.from_maps(np.stack([_sample_contractive_map(rng) for _ in range(m)]))
        if fill_threshold <= 0 or filling_ratio(ifs, fill_size, fill_points) >= fill_threshold:
            return ifs
    raise RuntimeError(f"no IFS with filling ratio >= {fill_threshold} in {max_tries} tries "
                       f"(seed={seed}, class={class_id}); lower fill_threshold")


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


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderConfig:
    """How points become pixels. Shared by a whole data set, so it is not part of an instance.

    Attributes:
        image_size: output height = width, in pixels.
        num_points: chaos-game points per image (FractalDB renders 100k at 362 px).
        steps: recorded steps per chain; ``ceil(num_points / steps)`` chains run in parallel.
        burn_in: unrecorded steps per chain, so chains forget their common start point.
        mode: ``"binary"`` (a pixel is on if any point hits it, as FractalDB) or ``"density"``
            (log(1 + count) / log(1 + max count)).
        color: one random colour per instance (3 channels) or grayscale (1 channel).
        splat_size: odd k; each point is drawn as a k x k patch (1 = single pixel).
        splat_random: use a random per-instance binary k x k pattern (FractalDB "patch" rendering)
            instead of a full square.
    """

    image_size: int = 224
    num_points: int = 100_000
    steps: int = 50
    burn_in: int = 20
    mode: str = "binary"
    color: bool = True
    splat_size: int = 1
    splat_random: bool = False

    def __post_init__(self):
        _check_int("image_size", self.image_size, 1)
        _check_int("num_points", self.num_points, 1)
        _check_int("steps", self.steps, 1)
        _check_int("burn_in", self.burn_in, 0)
        _check_int("splat_size", self.splat_size, 1)
        if self.splat_size % 2 == 0:
            raise ValueError(f"splat_size must be odd, got {self.splat_size}")
        if self.mode not in RENDER_MODES:
            raise ValueError(f"mode must be one of {RENDER_MODES}, got {self.mode!r}")

    @property
    def chains(self) -> int:
        return math.ceil(self.num_points / self.steps)

    @property
    def channels(self) -> int:
        return 3 if self.color else 1


@dataclass(frozen=True)
class InstanceParams:
    """Everything random about one image, drawn on the CPU from (seed, class, instance)."""

    ifs: IFS
    key: int  # 32-bit seed of the chaos game's map sequence
    color: np.ndarray  # [3] in (0, 1], brightest channel = 1
    splat: np.ndarray  # [k, k] float, centre on


@dataclass(frozen=True)
class PackedInstances:
    """A batch of :class:`InstanceParams` as the arrays the renderer consumes.

    Why: pickling thousands of small objects between processes costs ~0.1 ms each, more than drawing
    them; packed arrays cross process boundaries (and get sliced into render batches) for free.

    Attributes:
        maps: ``[B, MAX_MAPS, 6]`` float32, zero rows past each system's M.
        thresholds: ``[B, MAX_MAPS - 1]`` int64 cumulative probabilities scaled to ``2**32``
            (``2**32`` for padding, so padding maps are never selected).
        start: ``[B, 2]`` float32 fixed point of each system's most probable map.
        keys: ``[B]`` int64 chaos-game keys.
        colors: ``[B, 3]`` float32.
        splats: ``[B, k, k]`` float32.
    """

    maps: np.ndarray
    thresholds: np.ndarray
    start: np.ndarray
    keys: np.ndarray
    colors: np.ndarray
    splats: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __getitem__(self, sl: slice) -> "PackedInstances":
        if not isinstance(sl, slice):
            raise TypeError("PackedInstances supports slices only (e.g. packed[0:64])")
        return PackedInstances(*(getattr(self, f.name)[sl] for f in fields(self)))

    @classmethod
    def concat(cls, parts: Sequence["PackedInstances"]) -> "PackedInstances":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def pack_instances(params: Sequence[InstanceParams] | PackedInstances) -> PackedInstances:
    """Pack instances into renderer arrays (a :class:`PackedInstances` passes through)."""
    if isinstance(params, PackedInstances):
        return params
    b = len(params)
    maps = np.zeros((b, MAX_MAPS, 6), dtype=np.float32)
    thr = np.full((b, MAX_MAPS - 1), 2**32, dtype=np.int64)
    start = np.zeros((b, 2), dtype=np.float32)
    for i, p in enumerate(params):
        m = p.ifs.num_maps
        maps[i, :m] = p.ifs.maps
        cum = np.cumsum(p.ifs.probs)[:-1]
        thr[i, :m - 1] = np.floor(cum * 2**32).astype(np.int64)
        start[i] = p.ifs.fixed_point(int(np.argmax(p.ifs.probs)))
    keys = np.array([p.key for p in params], dtype=np.int64)
    colors = np.stack([p.color for p in params]).astype(np.float32) if b else np.zeros((0, 3), np.float32)
    splats = np.stack([p.splat for p in params]).astype(np.float32) if b else np.zeros((0, 1, 1), np.float32)
    return PackedInstances(maps, thr, start, keys, colors, splats)


def chaos_game(maps: torch.Tensor, thresholds: torch.Tensor, start: torch.Tensor, keys: torch.Tensor,
               chains: int, steps: int, burn_in: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``chains`` chaos-game chains per instance, all instances at once.

    The map of chain c at step t is chosen by comparing ``hash(key, t * chains + c)`` with the
    cumulative-probability thresholds, in integers, so the choice is exact and device independent.

    Args:
        maps: ``[B, MAX_MAPS, 6]`` float32 (padding rows are never selected).
        thresholds: ``[B, MAX_MAPS - 1]`` int64 cumulative probabilities scaled to ``2**32``
            (``2**32`` for padding).
        start: ``[B, 2]`` float32 start point (a fixed point of one map).
        keys: ``[B]`` int64 in ``[0, 2**32)``.
        chains, steps, burn_in: chains per instance, recorded steps, unrecorded leading steps.
    Returns:
        ``(xs, ys)``, each ``[B, steps * chains]`` float32 points on the attractor.
    """
    b = maps.shape[0]
    device = maps.device
    x = start[:, 0:1].expand(b, chains).contiguous()
    y = start[:, 1:2].expand(b, chains).contiguous()
    chain_ids = torch.arange(chains, device=device, dtype=torch.int64)[None, :]
    key_mix = _hash32(keys[:, None] & _MASK32)
    # [6, B * MAX_MAPS]: one index_select yields contiguous coefficient planes (gather with an
    # expanded index, or strided columns, is 2-3x slower on CPU).
    planes = maps.permute(2, 0, 1).reshape(6, b * maps.shape[1]).contiguous()
    row_offset = torch.arange(b, device=device, dtype=torch.int64)[:, None] * maps.shape[1]
    xs = torch.empty(b, steps, chains, device=device, dtype=torch.float32)
    ys = torch.empty_like(xs)
    for t in range(burn_in + steps):
        counter = ((t * chains + chain_ids) * _GOLDEN32) & _MASK32  # distinct per (step, chain)
        h = _hash32(counter ^ key_mix)
        # [B, chains] map index = number of thresholds <= h, in exact integers. (searchsorted gives
        # the same but stalls in its thread pool on small inputs when cores are oversubscribed.)
        k = (h[:, :, None] >= thresholds[:, None, :]).sum(-1)
        c = planes.index_select(1, (k + row_offset).reshape(-1)).view(6, b, chains)
        # Separate mul/add ops (never addcmul/fma) keep every value IEEE-rounded the same way.
        x_new = c[0] * x + c[1] * y + c[4]
        y = c[2] * x + c[3] * y + c[5]
        x = x_new
        if t >= burn_in:
            xs[:, t - burn_in] = x
            ys[:, t - burn_in] = y
    return xs.reshape(b, -1), ys.reshape(b, -1)


def rasterize(xs: torch.Tensor, ys: torch.Tensor, size: int) -> torch.Tensor:
    """Count points per pixel after fitting each instance's bounding box to the image.

    Each axis is scaled independently (as FractalDB does), so every attractor spans the image.

    Args:
        xs, ys: ``[B, N]`` float32 points.
        size: output height = width.
    Returns:
        ``[B, size, size]`` int64 counts (row = y, column = x).
    """
    b = xs.shape[0]

    def to_pixel(v: torch.Tensor) -> torch.Tensor:
        lo = v.amin(dim=1, keepdim=True)
        span = (v.amax(dim=1, keepdim=True) - lo).clamp_min(1e-12)
        # v - lo >= 0, so truncation is floor (and avoids floor's slow small-tensor path on CPU).
        return ((v - lo) / span * size).long().clamp_(0, size - 1)

    flat = to_pixel(ys) * size + to_pixel(xs)
    flat = flat + torch.arange(b, device=xs.device, dtype=torch.int64)[:, None] * (size * size)
    return torch.bincount(flat.reshape(-1), minlength=b * size * size).reshape(b, size, size)


def _splat(counts: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Draw every point as its instance's k x k pattern: a sum of shifted count images.

    Why shifts rather than conv2d: exact integer-valued sums, identical for any batch size and device.

    Args:
        counts: ``[B, S, S]`` int64.
        kernels: ``[B, k, k]`` float32 with odd k.
    Returns:
        ``[B, S, S]`` float32.
    """
    k = kernels.shape[-1]
    if k == 1:
        return counts.float() * kernels[:, 0, 0, None, None]
    r = k // 2
    s = counts.shape[-1]
    padded = torch.nn.functional.pad(counts.float(), (r, r, r, r))
    out = torch.zeros(counts.shape, dtype=torch.float32, device=counts.device)
    for dy in range(k):
        for dx in range(k):
            out = out + padded[:, dy:dy + s, dx:dx + s] * kernels[:, dy, dx, None, None]
    return out


def filling_ratio(ifs: IFS, size: int = 32, num_points: int = 4000, key: int = 0) -> float:
    """Fraction of pixels a coarse binary single-pixel render of ``ifs`` covers (FractalDB's filter).

    The estimate depends on the key (the bounding box follows the most extreme points), so the class
    filter always uses the default key: re-evaluating a class reproduces the value it passed with.

    Args:
        ifs: the system.
        size, num_points: resolution and points of the render.
        key: chaos-game key.
    """
    # Short chains: a coarse coverage estimate needs many chains more than long ones.
    cfg = RenderConfig(image_size=size, num_points=num_points, steps=10, burn_in=20, mode="binary", color=False)
    params = InstanceParams(ifs=ifs, key=key, color=np.ones(3), splat=np.ones((1, 1)))
    img = render_instances([params], cfg)
    return float((img > 0).float().mean())


def instance_points(params: Sequence[InstanceParams] | PackedInstances, cfg: RenderConfig,
                    device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Chaos-game points of a batch of instances (before binning).

    Args:
        params: B instances (from :meth:`FractalGenerator.instance_params`), or them packed.
        cfg: uses ``num_points``, ``steps``, ``burn_in``.
        device: where the chaos game runs.
    Returns:
        ``(xs, ys)``, each ``[B, cfg.num_points]`` float32 on ``device``.
    """
    if len(params) == 0:
        raise ValueError("need at least one instance to render")
    packed = pack_instances(params)
    dev = torch.device(device)
    xs, ys = chaos_game(
        torch.from_numpy(packed.maps).to(dev), torch.from_numpy(packed.thresholds).to(dev),
        torch.from_numpy(packed.start).to(dev), torch.from_numpy(packed.keys).to(dev),
        cfg.chains, cfg.steps, cfg.burn_in)
    n = cfg.num_points  # the last chains' surplus points are dropped so the count is exact
    return xs[:, :n], ys[:, :n]


def render_instances(params: Sequence[InstanceParams] | PackedInstances, cfg: RenderConfig,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Render a batch of instances with the chaos game.

    Args:
        params: B instances (from :meth:`FractalGenerator.instance_params`), or them packed.
        cfg: rendering settings; ``splat_size`` must match the instances' splat kernels.
        device: where the chaos game and binning run.
    Returns:
        ``[B, C, S, S]`` float32 in ``[0, 1]`` on ``device``; C = 3 if ``cfg.color`` else 1.
    """
    packed = pack_instances(params)
    xs, ys = instance_points(packed, cfg, device)
    dev = xs.device
    counts = rasterize(xs, ys, cfg.image_size)
    kernels = torch.from_numpy(packed.splats).to(dev)
    if kernels.shape[-1] != cfg.splat_size:
        raise ValueError(f"instances carry {kernels.shape[-1]}x{kernels.shape[-1]} splats, "
                         f"cfg.splat_size={cfg.splat_size}")
    hits = _splat(counts, kernels)
    if cfg.mode == "binary":
        inten = (hits > 0).float()
    else:
        # log1p through a CPU-computed table: CUDA's and the CPU's log1p may differ in the last bit,
        # and counts are integers, so a lookup keeps density renders device independent.
        lut = torch.log1p(torch.arange(int(hits.max()) + 1, dtype=torch.float64)).float().to(dev)
        logc = lut[hits.long()]
        inten = logc / logc.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    inten = inten[:, None]
    if not cfg.color:
        return inten
    col = torch.from_numpy(packed.colors).to(dev)
    return inten * col[:, :, None, None]


# ----------------------------------------------------------------------------------------------
# generator and dataset
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FractalGenerator:
    """Deterministic (class, instance) -> image map for one seed and one set of render settings.

    Attributes:
        seed: generator seed; classes of different seeds are unrelated.
        render: :class:`RenderConfig`.
        noise_std: per-parameter instance noise (see :func:`perturb_ifs`).
        fill_threshold, fill_size, fill_points: the class filter (see :func:`sample_class_ifs`).
    """

    seed: int = 0
    render: RenderConfig = field(default_factory=RenderConfig)
    noise_std: float = 0.05
    fill_threshold: float = 0.1
    fill_size: int = 32
    fill_points: int = 4000

    def __post_init__(self):
        _check_int("seed", self.seed, 0)
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if not 0.0 <= self.fill_threshold < 1.0:
            raise ValueError(f"fill_threshold must be in [0, 1), got {self.fill_threshold!r}")

    def class_ifs(self, class_id: int) -> IFS:
        """The unperturbed system of ``class_id``."""
        return sample_class_ifs(self.seed, int(class_id), self.fill_threshold, self.fill_size, self.fill_points)

    def instance_params(self, class_id: int, instance: int) -> InstanceParams:
        """All random choices of image (class_id, instance), from ``default_rng([seed, class, instance])``."""
        _check_int("instance", instance, 0)
        rng = np.random.default_rng([self.seed, int(class_id), int(instance)])
        ifs = perturb_ifs(self.class_ifs(class_id), rng, self.noise_std)
        color = rng.uniform(0.2, 1.0, size=3)
        color = color / color.max()
        k = self.render.splat_size
        if self.render.splat_random:
            splat = (rng.random((k, k)) < 0.5).astype(np.float64)
            splat[k // 2, k // 2] = 1.0
        else:
            splat = np.ones((k, k))
        return InstanceParams(ifs=ifs, key=int(rng.integers(0, 2**32)), color=color, splat=splat)

    def instance_params_many(self, class_ids: Sequence[int], instances: Sequence[int],
                             workers: int = 0) -> PackedInstances:
        """:meth:`instance_params` of many images, packed, optionally drawn in ``workers`` CPU processes.

        Why processes: drawing a class (its filling-ratio filter) and an instance costs ~15 ms and
        ~0.4 ms of single-threaded numpy, so the ~10^5 images of a pretraining set would keep the CPU
        busy for a minute while the GPU renders them in seconds. Results are identical for any
        ``workers``: every draw depends on (seed, class, instance) only.

        Args:
            class_ids, instances: length-B sequences of non-negative ints.
            workers: processes (0 or 1: in this process; small requests always run here).
        """
        if len(class_ids) != len(instances):
            raise ValueError(f"class_ids and instances differ in length: {len(class_ids)} vs {len(instances)}")
        _check_int("workers", workers, 0)
        pairs = [(int(c), int(i)) for c, i in zip(class_ids, instances)]
        if workers <= 1 or len(pairs) < _PARALLEL_MIN_ITEMS:
            return _params_chunk((self, pairs))
        # Contiguous chunks keep one class in few workers (each worker draws a class once, then caches it).
        size = math.ceil(len(pairs) / (4 * workers))
        chunks = [pairs[s:s + size] for s in range(0, len(pairs), size)]
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread_worker) as pool:
            parts = list(pool.map(_params_chunk, [(self, chunk) for chunk in chunks]))
        return PackedInstances.concat(parts)

    def render_images(self, class_ids: Sequence[int], instances: Sequence[int],
                      device: torch.device | str = "cpu", batch_size: int = 64, workers: int = 0) -> torch.Tensor:
        """Render images (class_ids[i], instances[i]) in batches.

        Args:
            class_ids, instances: length-B sequences of non-negative ints.
            device: render device; the result stays there.
            batch_size: instances per chaos-game batch (memory ~ batch_size * num_points * 8 bytes).
            workers: CPU processes drawing the instance parameters (see :meth:`instance_params_many`).
        Returns:
            ``[B, C, S, S]`` float32 in ``[0, 1]``.
        """
        _check_int("batch_size", batch_size, 1)
        params = self.instance_params_many(class_ids, instances, workers)  # packed: slicing is free
        outs = [render_instances(params[s:s + batch_size], self.render, device)
                for s in range(0, len(params), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.render.channels, self.render.image_size,
                                                        self.render.image_size, device=device)


_PARALLEL_MIN_ITEMS = 256  # below this, starting processes costs more than it saves


def _single_thread_worker() -> None:
    """Process-pool initializer: one torch thread per worker (the filling filter renders with torch),
    as DataLoader workers do, so forked workers neither oversubscribe cores nor reuse the parent's pool."""
    torch.set_num_threads(1)


def _params_chunk(job: Tuple[FractalGenerator, List[Tuple[int, int]]]) -> PackedInstances:
    gen, pairs = job
    return pack_instances([gen.instance_params(c, i) for c, i in pairs])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise ``[0, 1]`` images to uint8, as a stored FractalDB PNG would be.

    Why: cached and on-the-fly samples are then bit-identical, and a cache takes 4x less memory.
    """
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class FractalDataset(Dataset):
    """FractalDB-style classification set: ``num_classes`` x ``instances_per_class`` images.

    Item ``i`` is class ``class_offset + i // instances_per_class``, instance
    ``instance_offset + i % instances_per_class``, labelled ``i // instances_per_class``. Disjoint
    instance ranges give disjoint train/val/test splits of the same classes; a class offset gives
    classes the pretraining never saw.

    Args:
        num_classes: classes (>= 1).
        instances_per_class: images per class (>= 1).
        image_size: height = width (>= 1).
        seed: generator seed.
        class_offset: first class id.
        instance_offset: first instance id.
        num_points, steps, burn_in, mode, color, splat_size, splat_random: see :class:`RenderConfig`.
        noise_std, fill_threshold: see :class:`FractalGenerator`.
        cache: render everything at construction (on ``device``) and keep uint8 images in CPU memory.
        device: render device for the cache and :meth:`get_batch`.
        batch_size: instances rendered together (GPU memory ~ batch_size * num_points * 8 bytes).
        augment: random resized crop + flip of every item and batch (training splits only); the
            stored or rendered image itself stays deterministic.
        workers: CPU processes drawing instance parameters for large renders.
    Items:
        ``([3, H, W] float32 normalised with ImageNet mean/std, label int)``; grayscale renders are
        repeated over 3 channels.
    """

    def __init__(self, num_classes: int, instances_per_class: int, image_size: int, seed: int = 0,
                 class_offset: int = 0, instance_offset: int = 0, num_points: int = 100_000, steps: int = 50,
                 burn_in: int = 20, mode: str = "binary", color: bool = True, splat_size: int = 1,
                 splat_random: bool = False, noise_std: float = 0.05, fill_threshold: float = 0.1,
                 cache: bool = False, device: torch.device | str = "cpu", batch_size: int = 64,
                 augment: bool = False, workers: int = 0):
        _check_int("num_classes", num_classes, 1)
        _check_int("instances_per_class", instances_per_class, 1)
        _check_int("image_size", image_size, 1)
        _check_int("class_offset", class_offset, 0)
        _check_int("instance_offset", instance_offset, 0)
        _check_int("workers", workers, 0)
        self.num_classes = int(num_classes)
        self.instances_per_class = int(instances_per_class)
        self.class_offset = int(class_offset)
        self.instance_offset = int(instance_offset)
        self.device = device
        self.batch_size = batch_size
        self.augment = bool(augment)
        self.workers = int(workers)
        render = RenderConfig(image_size=image_size, num_points=num_points, steps=steps, burn_in=burn_in,
                              mode=mode, color=color, splat_size=splat_size, splat_random=splat_random)
        self.generator = FractalGenerator(seed=seed, render=render, noise_std=noise_std,
                                          fill_threshold=fill_threshold)
        self._cache: Optional[torch.Tensor] = None
        if cache:
            self._cache = self.render_uint8(range(len(self)))[0].cpu()

    def __len__(self) -> int:
        return self.num_classes * self.instances_per_class

    def _ids(self, index: int) -> Tuple[int, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} fractal images")
        index %= len(self)
        label = index // self.instances_per_class
        return self.class_offset + label, self.instance_offset + index % self.instances_per_class, label

    @property
    def targets(self) -> List[int]:
        """Labels of all items, in order (for stratified subsets)."""
        return [i // self.instances_per_class for i in range(len(self))]

    def render_uint8(self, indices: Sequence[int], device: torch.device | str | None = None,
                     batch_size: Optional[int] = None, workers: Optional[int] = None,
                     progress: Optional[Callable[[int], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` as stored images, without augmentation or normalisation.

        Stage 0 keeps a whole pretraining set like this in GPU memory (150 kB per 224 px image, 4x
        less than float32) and normalises each batch as it trains. Each render batch is quantised
        as soon as it is drawn, so the float32 images never exist all at once.

        Args:
            indices: B item indices.
            device: render device (default: the dataset's ``device``).
            batch_size: instances per chaos-game batch (default: the dataset's); larger batches keep
                a GPU busy (~3 MB of GPU memory per 224 px instance at 100k points).
            workers: CPU processes drawing instance parameters (default: the dataset's).
            progress: called with the number of images finished after every render batch.
        Returns:
            ``(images [B, 3, H, W] uint8, labels [B] int64)`` on the render device.
        """
        ids = [self._ids(int(i)) for i in indices]
        dev = torch.device(self.device if device is None else device)
        bs = batch_size or self.batch_size
        _check_int("batch_size", bs, 1)
        packed = self.generator.instance_params_many([c for c, _, _ in ids], [k for _, k, _ in ids],
                                                     self.workers if workers is None else workers)
        size = self.generator.render.image_size
        out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8, device=dev)
        for s in range(0, len(ids), bs):
            img = render_instances(packed[s:s + bs], self.generator.render, dev)
            out[s:s + bs] = to_uint8(img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img)
            if progress is not None:
                progress(img.shape[0])
        return out, torch.tensor([label for _, _, label in ids], dtype=torch.int64, device=dev)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> (augmented) normalised float32."""
        if self.augment:
            images = random_resized_crop_flip(images.float())
        return normalize_uint8(images)

    def get_batch(self, indices: Sequence[int], device: torch.device | str | None = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` rendered together (fast on GPU): the same values as indexing one by one.

        Args:
            indices: B item indices.
            device: render device (default: the dataset's ``device``); ignored when cached.
        Returns:
            ``(x [B, 3, H, W] float32 normalised, y [B] int64)``, on the CPU if cached else on the
            render device. With ``augment`` each call draws new crops.
        """
        if self._cache is not None:
            labels = torch.tensor([self._ids(int(i))[2] for i in indices], dtype=torch.int64)
            return self._finish(self._cache[list(indices)]), labels
        images, labels = self.render_uint8(indices, device)
        return self._finish(images), labels

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        _, _, label = self._ids(index)
        image = self._cache[index] if self._cache is not None else self.render_uint8([index])[0][0].cpu()
        return self._finish(image[None])[0], label


# ----------------------------------------------------------------------------------------------
# registered tasks
# ----------------------------------------------------------------------------------------------
@dataclass
class _FractalCommonOptions:
    """Fields shared by both fractal tasks; pretraining and held-out runs must agree on the render
    fields (seed, num_points, mode, color, splat_*, noise_std, fill_threshold) for the held-out gap to
    be only "unseen classes"."""

    image_size: int = field(default=224, metadata={"help": "image height = width in pixels"})
    seed: int = field(default=0, metadata={"help": "fractal generator seed (classes depend on it)"})
    num_points: int = field(default=100_000, metadata={"help": "chaos-game points per image"})
    mode: str = field(default="binary", metadata={"help": "pixel intensity: binary | density"})
    color: bool = field(default=True, metadata={"help": "one random colour per instance (else grayscale)"})
    splat_size: int = field(default=1, metadata={"help": "odd k: draw each point as a k x k patch"})
    splat_random: bool = field(default=False, metadata={"help": "random k x k pattern per instance (FractalDB patch)"})
    noise_std: float = field(default=0.05, metadata={"help": "std of the per-parameter instance noise"})
    fill_threshold: float = field(default=0.1, metadata={"help": "minimum filling ratio of a class (0 disables)"})
    cache: bool = field(default=False, metadata={"help": "render all images once at build time (uint8 in RAM)"})
    augment: bool = field(default=False, metadata={
        "help": "random resized crop + flip of training items (stage 0 applies it to its GPU-resident set)"})
    device: str = field(default="cpu", metadata={"help": "render device, e.g. cuda (for cache / get_batch)"})

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("num_classes", "train_per_class", "val_per_class", "test_per_class", "image_size",
                     "num_points", "splat_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{cls}.seed must be an integer >= 0, got {self.seed!r}")
        if self.mode not in RENDER_MODES:
            raise ValueError(f"{cls}.mode must be one of {RENDER_MODES}, got {self.mode!r}")
        if self.splat_size % 2 == 0:
            raise ValueError(f"{cls}.splat_size must be odd, got {self.splat_size}")
        if not self.noise_std >= 0:
            raise ValueError(f"{cls}.noise_std must be >= 0, got {self.noise_std!r}")
        if not 0.0 <= self.fill_threshold < 1.0:
            raise ValueError(f"{cls}.fill_threshold must be in [0, 1), got {self.fill_threshold!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"{cls}.device must be a torch device string such as 'cpu' or 'cuda:0', "
                             f"got {self.device!r}") from None

    def first_class(self) -> int:
        return 0


@dataclass
class FractalOptions(_FractalCommonOptions):
    """Options of the ``fractal`` pretraining task: classes ``[0, num_classes)``."""

    num_classes: int = field(default=1000, metadata={
        "help": f"fractal classes (FractalDB-1k uses 1000); <= {HELDOUT_CLASS_OFFSET} so held-out classes stay unseen"})
    train_per_class: int = field(default=100, metadata={"help": "training instances per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation instances per class"})
    test_per_class: int = field(default=10, metadata={"help": "test instances per class"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes > HELDOUT_CLASS_OFFSET:
            raise ValueError(f"FractalOptions.num_classes must be <= {HELDOUT_CLASS_OFFSET} (held-out classes start "
                             f"there), got {self.num_classes}")


@dataclass
class FractalHeldoutOptions(_FractalCommonOptions):
    """Options of ``fractal_heldout``: classes ``[class_offset, class_offset + num_classes)``, which
    no ``fractal`` run can use (its classes stay below ``HELDOUT_CLASS_OFFSET``)."""

    num_classes: int = field(default=100, metadata={"help": "held-out fractal classes"})
    train_per_class: int = field(default=50, metadata={"help": "training instances per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation instances per class"})
    test_per_class: int = field(default=20, metadata={"help": "test instances per class"})
    class_offset: int = field(default=HELDOUT_CLASS_OFFSET, metadata={
        "help": f"first class id; >= {HELDOUT_CLASS_OFFSET} so pretraining classes are never reused"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.class_offset, bool) or not isinstance(self.class_offset, int) \
                or self.class_offset < HELDOUT_CLASS_OFFSET:
            raise ValueError(f"FractalHeldoutOptions.class_offset must be an integer >= {HELDOUT_CLASS_OFFSET} "
                             f"(pretraining uses classes below it), got {self.class_offset!r}")

    def first_class(self) -> int:
        return self.class_offset


def _fractal_splits(opts: _FractalCommonOptions) -> ClassificationSplits:
    """Train/val/test as disjoint instance ranges [0, n_tr), [n_tr, n_tr + n_val), ... of each class."""
    common = dict(num_classes=opts.num_classes, image_size=opts.image_size, seed=opts.seed,
                  class_offset=opts.first_class(), num_points=opts.num_points, mode=opts.mode, color=opts.color,
                  splat_size=opts.splat_size, splat_random=opts.splat_random, noise_std=opts.noise_std,
                  fill_threshold=opts.fill_threshold, cache=opts.cache, device=opts.device)
    n_tr, n_val = opts.train_per_class, opts.val_per_class
    return ClassificationSplits(
        train=FractalDataset(instances_per_class=n_tr, instance_offset=0, augment=opts.augment, **common),
        val=FractalDataset(instances_per_class=n_val, instance_offset=n_tr, **common),
        test=FractalDataset(instances_per_class=opts.test_per_class, instance_offset=n_tr + n_val, **common),
        num_classes=opts.num_classes)


def _fractal_info(opts: _FractalCommonOptions, kind: str) -> dict:
    info = {f.name: getattr(opts, f.name) for f in fields(opts)}
    first = opts.first_class()
    info.update(source=f"FractalDB-style IFS ({kind})", classes=[first, first + opts.num_classes],
                normalization="imagenet")
    return info


@register_task("fractal", FractalOptions)
def build_fractal(opts: FractalOptions, data_root: str) -> TaskData:
    """FractalDB-style pretraining classification over classes [0, num_classes) (no files needed)."""
    return classification_task_data(_fractal_splits(opts), _fractal_info(opts, "pretraining"))


@register_task("fractal_heldout", FractalHeldoutOptions)
def build_fractal_heldout(opts: FractalHeldoutOptions, data_root: str) -> TaskData:
    """Small-gap target: fractal classes from 10000 on, disjoint from any pretraining class."""
    return classification_task_data(_fractal_splits(opts), _fractal_info(opts, "held-out classes"))
