"""The chaos-game renderer of the FractalDB-style data: IFS instances to images, batched on any device.

Rendering runs many chaos-game chains in parallel (vectorised over instances and chains), fits the
points' bounding box to the image (each axis independently, as FractalDB does) and counts points
per pixel with ``bincount``; optional k x k splatting (FractalDB's patch rendering), binary or
log-density intensity, grayscale or one colour per instance.

Determinism: the chaos game's map sequence comes from an integer counter hash evaluated on the
render device. Integer hashing, integer pixel counts and single IEEE-rounded float elementwise ops
(no fused or reduced float arithmetic) make an image the same whichever batch renders it, and on
CPU or GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence, Tuple

import numpy as np
import torch

from datasets.fractal_ifs import IFS, MAX_MAPS, check_int

RENDER_MODES = ("binary", "density")

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1  # odd constant spreading consecutive counters over 32 bits
_HASH_MULT = 0x45D9F3B  # < 2**31, so products of 32-bit values fit in int64 without overflow


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
        check_int("image_size", self.image_size, 1)
        check_int("num_points", self.num_points, 1)
        check_int("steps", self.steps, 1)
        check_int("burn_in", self.burn_in, 0)
        check_int("splat_size", self.splat_size, 1)
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
