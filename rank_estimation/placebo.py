"""Placebo rank maps: the stage-2 map's parameters spread by something other than the measured gaps.

An adaptive map can beat a uniform one for reasons that have nothing to do with the gap: it may
adapt modules the uniform run leaves out, or simply favour some depths. The equal-budget comparison
therefore runs the stage-2 map against maps that keep *everything but the gap information*: the same
module set (the map's keys) and exactly the same adapter parameter count (sum over modules of
rank x (d_in + d_out)), with ranks set by

- :func:`uniform_map`: equal weight everywhere (uniform ranks, up to the few units that make the
  count exact);
- :func:`shuffled_gap_map`: the measured block gaps permuted across blocks (seeded): the same gap
  values, attached to the wrong layers;
- :func:`depth_only_map`: weights falling linearly with depth (the generic "early layers need
  more" prior, with no measurement at all).

All three go through one allocator, :func:`proportional_map`: ranks proportional to the weights,
clipped to [r_min, r_max], rounded down, then filled unit by unit (largest shortfall first, among
the modules whose cost still fits) until the count is exactly the target. Exactness is possible
because every Swin Linear's cost d_in + d_out is a multiple of the smallest one's (the stage-0
``proj``, 2 C); :func:`proportional_map` raises when a count cannot be met.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from rank_estimation.allocate import expand

__all__ = ["adapter_params", "depth_only_map", "proportional_map", "shuffled_gap_map", "uniform_map"]


def adapter_params(rank_map: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """LoRA parameters of a rank map: sum of rank x (d_in + d_out)."""
    missing = sorted(set(rank_map) - set(costs))
    if missing:
        raise ValueError(f"rank map names modules without a cost: {missing[:3]}")
    return int(sum(int(r) * int(costs[m]) for m, r in rank_map.items()))


def proportional_map(weights: Mapping[str, float], costs: Mapping[str, int], total: int, r_min: int = 1,
                     r_max: int = 64) -> Dict[str, int]:
    """Integer ranks proportional to ``weights`` whose parameter count is exactly ``total``.

    Args:
        weights: module -> weight >= 0 (the module set of the result), in forward order.
        costs: module -> d_in + d_out.
        total: the exact parameter count to reach.
        r_min, r_max: rank bounds of every module.
    """
    names = list(weights)
    w = np.array([float(weights[m]) for m in names])
    c = np.array([int(costs[m]) for m in names], dtype=np.int64)
    if not names or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("proportional_map: weights must be a non-empty map of finite values >= 0")
    lo, hi = int((c * r_min).sum()), int((c * r_max).sum())
    if not lo <= total <= hi:
        raise ValueError(f"proportional_map: {total:,} parameters is outside [{lo:,}, {hi:,}] for ranks "
                         f"[{r_min}, {r_max}] on these {len(names)} modules")
    if w.sum() == 0:
        w = np.ones_like(w)
    # the scale s with sum c * clip(s w, r_min, r_max) = total (monotone in s: bisection)
    a, b = 0.0, float(r_max) / max(float(w[w > 0].min()), 1e-300)
    for _ in range(200):
        s = (a + b) / 2
        if float((c * np.clip(s * w, r_min, r_max)).sum()) < total:
            a = s
        else:
            b = s
    target = np.clip(b * w, r_min, r_max)
    ranks = np.floor(target).astype(np.int64)
    left = int(total - (c * ranks).sum())
    while left > 0:
        ok = (ranks < r_max) & (c <= left)
        if not ok.any():
            raise ValueError(f"proportional_map: {left} parameters cannot be placed exactly (smallest free "
                             f"module cost {int(c[ranks < r_max].min()) if (ranks < r_max).any() else 'none'})")
        i = int(np.argmax(np.where(ok, target - ranks, -np.inf)))
        ranks[i] += 1
        left -= int(c[i])
    return {m: int(r) for m, r in zip(names, ranks)}


def _check_map(stage2_map: Mapping[str, int], costs: Mapping[str, int]) -> int:
    if not stage2_map:
        raise ValueError("the stage-2 rank map is empty")
    return adapter_params(stage2_map, costs)


def _ordered(stage2_map: Mapping[str, int], costs: Mapping[str, int]) -> list:
    """The map's modules in forward order (the order of ``costs``)."""
    return [m for m in costs if m in stage2_map]


def uniform_map(stage2_map: Mapping[str, int], costs: Mapping[str, int], r_min: int = 1,
                r_max: int = 64) -> Dict[str, int]:
    """Equal ranks on the stage-2 map's modules, at its exact parameter count."""
    total = _check_map(stage2_map, costs)
    return proportional_map({m: 1.0 for m in _ordered(stage2_map, costs)}, costs, total, r_min, r_max)


def shuffled_gap_map(block_gaps: Mapping[str, float], stage2_map: Mapping[str, int], costs: Mapping[str, int],
                     seed: int = 0, r_min: int = 1, r_max: int = 64) -> Dict[str, int]:
    """Ranks proportional to the block gaps after a seeded permutation across blocks.

    Args:
        block_gaps: block name (``layers.i.blocks.j``) -> measured gap D >= 0, in forward order.
        stage2_map, costs: the map whose module set and parameter count are kept; module costs in forward order.
        seed: seed of the permutation (a derangement is not forced: a block may keep its own gap by chance).
    """
    total = _check_map(stage2_map, costs)
    blocks = list(block_gaps)
    perm = np.random.default_rng(seed).permutation(len(blocks))
    shuffled = {b: float(block_gaps[blocks[k]]) for b, k in zip(blocks, perm)}
    return proportional_map(expand(shuffled, _ordered(stage2_map, costs)), costs, total, r_min, r_max)


def depth_only_map(blocks: Sequence[str], stage2_map: Mapping[str, int], costs: Mapping[str, int], r_min: int = 1,
                   r_max: int = 64) -> Dict[str, int]:
    """Ranks falling linearly with depth: block k of L gets weight L - k (k = 0 first)."""
    total = _check_map(stage2_map, costs)
    blocks = list(blocks)
    weights = {b: float(len(blocks) - k) for k, b in enumerate(blocks)}
    return proportional_map(expand(weights, _ordered(stage2_map, costs)), costs, total, r_min, r_max)
