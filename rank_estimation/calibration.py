"""Choosing the primary gap metric by a rule fixed before its data: a calibration on the gap dial.

A gap metric is only useful for the hypothesis if it can order tasks by distance. Two things can
stop it: noise (two levels of the dial, which differ by construction, score the same within their
intervals) and saturation (far targets all score the ceiling, so the large-gap tasks tie). The rule
below tests both, on data whose order is known (the dial's levels) and on the three large-gap tasks
whose order is not known but must be *resolved*.

The rule (:data:`SELECTION_RULE`, also printed in every report) is applied by :func:`evaluate` and
:func:`select_primary`; the statistics come from :func:`joint_bootstrap`, which resamples images,
never layers: one replicate draws the source images once and the target images once per
*image group* (the dial's levels share one group: they are the same images, so their differences
are paired), and measures every layer of every set on that draw. A set's gap is the mean over the
body's blocks (the summary the hypothesis analysis uses); its interval and the intervals of
differences come from the same replicates, bias-corrected as :func:`rank_estimation.gaps.bootstrap_ci`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from rank_estimation.gaps import get_gap_metric, mmd_saturation

#: Candidate primary metrics, in order of preference when several pass (first passing one wins).
#: mmd_source first: it keeps the MMD family that stage 1 minimises and the IBP prior was built on;
#: sliced_w2_source next: unbounded and scale-free; the pooled-median mmd last, as the control whose
#: saturation motivated the calibration.
CANDIDATES = ("mmd_source", "sliced_w2_source", "mmd")
#: Bounded candidates and the bandwidth their saturation ratio uses (:func:`rank_estimation.gaps.mmd_saturation`).
BOUNDED = {"mmd_source": "source", "mmd": "pooled"}
#: A block-mean saturation ratio above this means the metric has reached its ceiling on that task.
SATURATION_LIMIT = 0.9
CI_LEVEL = 0.95

SELECTION_RULE = f"""\
Selection rule (fixed before the calibration ran). Every candidate ({', '.join(CANDIDATES)}) is
measured at every block of the body on the source set, every dial level, Darcy, tones and digits.
A set's gap is the mean over blocks; intervals are {int(CI_LEVEL * 100)}% bias-corrected percentile
bootstrap intervals over images (source and target images resampled; the dial's levels share one
resample of their common images, so differences between levels are paired).
1. The dial: the gap rises strictly with the level: for every adjacent pair of levels the interval of
   the paired difference D(level + 1) - D(level) lies above 0.
2. The tasks: Darcy, tones and digits are resolved (every pairwise difference of their gaps has an
   interval that excludes 0, in either direction) and none is saturated: for the bounded metrics
   (MMD^2 <= K_ss + K_tt), the block-mean of MMD^2 / (K_ss + K_tt) stays <= {SATURATION_LIMIT}
   (unbounded metrics cannot saturate).
The primary metric is the first candidate in the order above that passes 1 and 2. If none passes
both, it is the first that passes 1, and the task order is reported as unresolved. If none passes 1,
the dial has failed its calibration: that is reported, mmd_source stays the primary, and the dial
analysis is exploratory. The others are reported as sensitivity analyses. The rule is not revised
after the calibration has run."""


def _ci(value: float, reps: np.ndarray, level: float) -> tuple:
    """Bias-corrected percentile interval (the estimate's shift applied to the replicate quantiles)."""
    shift = value - float(reps.mean())
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo + shift), float(hi + shift)


def _set_gaps(fn, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], blocks: Sequence[str],
              i_s: Optional[torch.Tensor], i_t: Optional[torch.Tensor]) -> Dict[str, float]:
    out = {}
    for b in blocks:
        s, t = source[b], target[b]
        out[b] = float(fn(s if i_s is None else s[i_s], t if i_t is None else t[i_t]))
    return out


def joint_bootstrap(metric: str, source: Mapping[str, torch.Tensor], targets: Mapping[str, Mapping[str, torch.Tensor]],
                    blocks: Sequence[str], groups: Optional[Mapping[str, str]] = None, n_boot: int = 200,
                    seed: int = 0, level: float = CI_LEVEL) -> Dict[str, Any]:
    """Per-block gaps and their block mean for every target set, with replicates that resample images.

    Args:
        metric: a registered gap metric (called as ``metric(source, target)``).
        source: layer -> ``[m, d]`` source features.
        targets: set name -> (layer -> ``[n, d]`` features).
        blocks: the layers averaged into a set's gap.
        groups: set name -> image group; sets of one group hold the same images in the same order
            (equal n) and share each replicate's resample. Default: every set its own group.
        n_boot: replicates (>= 2).
        seed: resampling seed.
        level: interval coverage.

    Returns:
        ``{"metric", "blocks", "n_boot", "level", "sets": {name: {"blocks": {b: value}, "value", "lo", "hi"}},
        "replicates": {name: [n_boot] block means}}``.
    """
    if n_boot < 2:
        raise ValueError(f"joint_bootstrap: n_boot={n_boot} must be >= 2")
    if not blocks:
        raise ValueError("joint_bootstrap: blocks is empty")
    fn = get_gap_metric(metric)
    groups = dict(groups or {name: name for name in targets})
    missing = sorted(set(targets) - set(groups))
    if missing:
        raise ValueError(f"joint_bootstrap: sets without an image group: {missing}")
    sizes: Dict[str, int] = {}
    for name, feats in targets.items():
        n = int(feats[blocks[0]].shape[0])
        if sizes.setdefault(groups[name], n) != n:
            raise ValueError(f"joint_bootstrap: set {name!r} has {n} images, its group {groups[name]!r} "
                             f"{sizes[groups[name]]}; a group's sets must hold the same images")
    m = int(source[blocks[0]].shape[0])
    sets: Dict[str, Dict[str, Any]] = {}
    for name, feats in targets.items():
        per_block = _set_gaps(fn, source, feats, blocks, None, None)
        sets[name] = {"blocks": per_block, "value": float(np.mean(list(per_block.values())))}
    gen = torch.Generator().manual_seed(seed)
    reps = {name: np.empty(n_boot) for name in targets}
    for r in range(n_boot):
        i_s = torch.randint(m, (m,), generator=gen)
        draws = {g: torch.randint(n, (n,), generator=gen) for g, n in sorted(sizes.items())}
        for name, feats in targets.items():
            reps[name][r] = np.mean(list(_set_gaps(fn, source, feats, blocks, i_s, draws[groups[name]]).values()))
    for name in targets:
        sets[name]["lo"], sets[name]["hi"] = _ci(sets[name]["value"], reps[name], level)
    return {"metric": metric, "blocks": list(blocks), "n_boot": n_boot, "level": level, "sets": sets,
            "replicates": {k: v.tolist() for k, v in reps.items()}}


def difference(result: Mapping[str, Any], a: str, b: str) -> Dict[str, float]:
    """Gap of set ``a`` minus set ``b`` with its interval from the shared replicates."""
    value = result["sets"][a]["value"] - result["sets"][b]["value"]
    reps = np.asarray(result["replicates"][a]) - np.asarray(result["replicates"][b])
    lo, hi = _ci(value, reps, result["level"])
    return {"a": a, "b": b, "value": value, "lo": lo, "hi": hi}


def saturation(metric: str, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
               blocks: Sequence[str]) -> Optional[float]:
    """Block-mean saturation ratio of a bounded candidate (None for an unbounded one)."""
    if metric not in BOUNDED:
        return None
    return float(np.mean([mmd_saturation(source[b], target[b], bandwidth=BOUNDED[metric]) for b in blocks]))


def evaluate(result: Mapping[str, Any], dial: Sequence[str], tasks: Sequence[str],
             saturations: Mapping[str, Optional[float]]) -> Dict[str, Any]:
    """Parts 1 and 2 of :data:`SELECTION_RULE` for one candidate.

    Args:
        result: :func:`joint_bootstrap`'s output for the candidate.
        dial: the dial's set names in level order.
        tasks: the large-gap tasks that must be resolved (Darcy, tones, digits).
        saturations: task -> block-mean saturation ratio (None: unbounded metric).
    """
    steps = [difference(result, hi, lo) for lo, hi in zip(dial, dial[1:])]
    rises = bool(steps) and all(s["lo"] > 0 for s in steps)
    pairs = [difference(result, a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    resolved = all(p["lo"] > 0 or p["hi"] < 0 for p in pairs)
    saturated = sorted(t for t, v in saturations.items() if v is not None and v > SATURATION_LIMIT)
    reasons: List[str] = []
    if not rises:
        reasons.append("dial levels not separated: " + ", ".join(f"{s['b']}->{s['a']}" for s in steps if s["lo"] <= 0))
    if not resolved:
        reasons.append("tasks not resolved: " + ", ".join(f"{p['a']}~{p['b']}" for p in pairs
                                                           if not (p["lo"] > 0 or p["hi"] < 0)))
    if saturated:
        reasons.append(f"saturated (ratio > {SATURATION_LIMIT}) on: {', '.join(saturated)}")
    order = sorted(tasks, key=lambda t: result["sets"][t]["value"])
    return {"metric": result["metric"], "rises": rises, "steps": steps, "resolved": resolved, "pairs": pairs,
            "saturation": dict(saturations), "saturated": saturated, "task_order": order,
            "passes": rises and resolved and not saturated, "reasons": reasons}


def select_primary(evaluations: Mapping[str, Mapping[str, Any]], order: Sequence[str] = CANDIDATES) -> Dict[str, str]:
    """The primary metric by :data:`SELECTION_RULE` and which clause chose it."""
    missing = [m for m in order if m not in evaluations]
    if missing:
        raise ValueError(f"select_primary: no evaluation for candidates {missing}")
    for metric in order:
        if evaluations[metric]["passes"]:
            return {"primary": metric, "clause": "passes the dial and the task criteria"}
    for metric in order:
        if evaluations[metric]["rises"]:
            return {"primary": metric, "clause": "passes the dial criterion only; the task order is unresolved"}
    return {"primary": "mmd_source", "clause": "no candidate passes the dial criterion: the dial failed its calibration"}


__all__ = ["BOUNDED", "CANDIDATES", "CI_LEVEL", "SATURATION_LIMIT", "SELECTION_RULE", "difference", "evaluate",
           "joint_bootstrap", "saturation", "select_primary"]
