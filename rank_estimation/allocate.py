"""Per-layer gaps -> an exact-budget LoRA rank map, through the IBP rank posterior P(r | D).

Why this file is long: it holds the rank map's pipeline in the order a map is made (input
checks, the calibrated posterior, the budget repair, per-block gaps onto Linears and their costs,
the empirical-Bayes gamma), each step a function the tests pin alone.

Pipeline, from posterior to rank map:

1. :func:`expand` maps gaps measured per block onto the block's Linear modules.
2. :func:`ibp.rank_posterior.sample_rank_posterior` calibrates beta so the posterior expected cost
   sum_i c_i E[r_i | D] meets the budget, then samples P(r | D) with several chains.
3. r_i = clip(round(E[r_i | D]), r_min, r_max) (or the posterior mode), then
   :func:`repair_budget` spends or frees single rank units, best posterior probability per parameter
   first (one-for-one swaps when the cheapest layers are saturated), until
   |sum_i c_i r_i - B| <= min_i c_i ("within one unit of the cheapest layer").

Why a greedy repair after a calibrated posterior: the posterior mean meets the budget only in
expectation (and only up to Monte-Carlo error), and rounding moves it further. The survival
function P(r_i >= k | D) is the posterior probability that layer i needs its k-th rank, so spending
by the largest P(r_i >= r_i + 1 | D) / c_i and freeing by the smallest P(r_i >= r_i | D) / c_i is
the ratio rule of the knapsack that maximises the expected number of needed units per parameter.
The repair moves few units because beta was calibrated first (``diagnostics["repair_steps"]``).
"""
from __future__ import annotations

import heapq
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ibp.rank_posterior import RankPosterior, sample_rank_posterior
from orca.adapters.targets import select_targets
from orca.errors import READ_ERRORS, reading
from rank_estimation.config import SUMMARIES, RankConfig

__all__ = [
    "RankAllocation",
    "allocate_ranks",
    "allocate_from_config",
    "check_budget",
    "repair_budget",
    "expand",
    "fit_gamma",
    "PowerLawFit",
    "costs_from_model",
    "swin_linear_costs",
]


# ---------------------------------------------------------------------------- result
@dataclass
class RankAllocation:
    """A rank map with the posterior it came from.

    Attributes:
        rank_map: module name -> rank.
        intervals: module name -> (lower, upper) equal-tailed credible interval of r_i.
        posterior_mean, posterior_sd: module name -> E[r_i | D], sd(r_i | D).
        gaps, costs: the inputs, module name -> D_i and c_i = d_in + d_out.
        budget: B, the parameter budget.
        trainable: sum_i c_i r_i of ``rank_map``.
        tolerance: the promised bound on |trainable - budget|, min_i c_i.
        r_min, r_max: the allowed rank range.
        level: probability mass of ``intervals``.
        prior: the model's parameters (alpha prior and posterior mean, beta, gamma, sigma, truncation).
        diagnostics: R-hat and ESS per layer and overall, bisection trace, repair steps, timings.
    """

    rank_map: Dict[str, int]
    intervals: Dict[str, Tuple[int, int]]
    posterior_mean: Dict[str, float]
    posterior_sd: Dict[str, float]
    gaps: Dict[str, float]
    costs: Dict[str, int]
    budget: int
    trainable: int
    tolerance: int
    r_min: int
    r_max: int
    level: float
    prior: Dict[str, Any] = field(default_factory=dict)
    diagnostics: Dict[str, Any] = field(default_factory=dict)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        """Serialise to JSON (and write it to ``path`` when given).

        Args:
            path: optional file to write.
        """
        payload = asdict(self)
        payload["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        text = json.dumps(payload, indent=1, sort_keys=False, default=_json_default)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, Path]) -> "RankAllocation":
        """Load from a JSON string or a path to a JSON file.

        Args:
            source: JSON text (starting with ``{``) or a file path; keys that are not fields
                (the extra records of stage 2's ``rank_map.json``) are ignored.
        """
        text = str(source)
        where = "the JSON text"
        if not text.lstrip().startswith("{"):
            where = str(source)
            text = Path(source).read_text(encoding="utf-8")
        with reading(where, "a rank allocation", "give the rank_map.json a stage-2 run wrote, unedited",
                     READ_ERRORS + (KeyError, TypeError, AttributeError, IndexError)):
            payload = json.loads(text)
            # stage 2's rank_map.json adds records (gap profile, provenance) around these fields
            known = {f.name for f in fields(cls)}
            payload = {k: v for k, v in payload.items() if k in known}
            payload["intervals"] = {k: (int(v[0]), int(v[1])) for k, v in payload["intervals"].items()}
            payload["rank_map"] = {k: int(v) for k, v in payload["rank_map"].items()}
            payload["costs"] = {k: int(v) for k, v in payload["costs"].items()}
            return cls(**payload)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------- input checks
def _validate(gaps: Mapping[str, float], costs: Mapping[str, int], budget: int, r_min: int,
              r_max: int) -> Tuple[List[str], np.ndarray, np.ndarray]:
    if not gaps:
        raise ValueError("gaps is empty: give one gap per adapted module")
    missing = [name for name in gaps if name not in costs]
    if missing:
        raise ValueError(f"costs has no entry for module {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [name for name in costs if name not in gaps]
    if extra:
        raise ValueError(f"gaps has no entry for module {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    names = list(gaps)
    for name in names:
        value = gaps[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"gap of {name!r} must be a number, got {value!r}")
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"gap of {name!r} must be finite and >= 0, got {value!r}")
        cost = costs[name]
        if isinstance(cost, bool) or int(cost) != cost or cost <= 0:
            raise ValueError(f"cost of {name!r} must be a positive integer (d_in + d_out), got {cost!r}")
    if not any(float(gaps[n]) > 0 for n in names):
        raise ValueError("all gaps are zero: they carry no information about ranks")
    for label, value in (("r_min", r_min), ("r_max", r_max), ("budget", budget)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{label} must be an integer, got {value!r}")
    if budget <= 0:
        raise ValueError(f"budget must be a positive integer (parameters to spend), got {budget}")
    if r_min < 0:
        raise ValueError(f"r_min must be >= 0, got {r_min}")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} > r_max={r_max}: no rank is allowed")
    c = np.array([int(costs[n]) for n in names], dtype=np.int64)
    d = np.array([float(gaps[n]) for n in names])
    check_budget(costs, budget, r_min, r_max)
    return names, d, c


def check_budget(costs: Mapping[str, int], budget: int, r_min: int, r_max: int) -> None:
    """Raise ValueError unless some rank map in [r_min, r_max] can spend ``budget`` parameters.

    Stage 2 calls this before it measures any gap, so an impossible budget fails in seconds.

    Args:
        costs: module name -> d_in + d_out.
        budget: B.
        r_min, r_max: allowed ranks.
    """
    if not costs:
        raise ValueError("no module to allocate ranks to (costs is empty): check the rank targets")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} > r_max={r_max}: no rank is allowed")
    total = int(sum(int(v) for v in costs.values()))
    smallest, largest = total * r_min, total * r_max
    if budget < smallest:
        raise ValueError(f"budget {budget} is below the smallest feasible rank map: r_min={r_min} on "
                         f"all {len(costs)} modules already costs {smallest} parameters")
    if budget > largest:
        raise ValueError(f"budget {budget} is above the largest feasible rank map: r_max={r_max} on "
                         f"all {len(costs)} modules costs {largest} parameters")


# ---------------------------------------------------------------------------- budget repair
def repair_budget(ranks: Sequence[int], costs: Sequence[int], budget: int, survival: np.ndarray,
                  r_min: int, r_max: int, tie_break: Optional[Sequence[float]] = None
                  ) -> Tuple[np.ndarray, Dict[str, int]]:
    """Move single rank units until |sum_i c_i r_i - budget| <= min_i c_i, best posterior value first.

    Over budget, free the unit with the smallest P(r_i >= r_i | D) / c_i; under budget, add the
    unit with the largest P(r_i >= r_i + 1 | D) / c_i among those that still fit; if the cheapest
    layers are all at r_max and the gap is still larger than min_i c_i, try one-for-one swaps.

    Args:
        ranks: starting ranks [N], inside [r_min, r_max].
        costs: c_i [N].
        budget: B.
        survival: P(r_i >= k | D) for k = 0..r_max + 1, [N, r_max + 2].
        r_min, r_max: allowed range.
        tie_break: per-layer secondary key [N] (larger = keep/add first), e.g. E[r_i | D]; used when
            survival probabilities tie (typically at 0 or 1 far from the posterior mass).

    Returns:
        ``(ranks, steps)``: the repaired ranks and a count of each move kind.
    """
    r = np.array(ranks, dtype=np.int64)
    c = np.asarray(costs, dtype=np.int64)
    n = r.size
    tb = np.zeros(n) if tie_break is None else np.asarray(tie_break, dtype=np.float64)
    steps = {"removed": 0, "added": 0, "swapped": 0}
    spent = int(np.dot(c, r))

    def value(i: int, unit: int) -> Tuple[float, float]:
        # the posterior probability that layer i needs its unit-th rank, per parameter
        return (survival[i, unit] / c[i], tb[i] - unit)

    if spent > budget:
        heap = [(value(i, r[i]), i) for i in range(n) if r[i] > r_min]
        heapq.heapify(heap)
        while spent > budget and heap:
            _, i = heapq.heappop(heap)
            r[i] -= 1
            spent -= int(c[i])
            steps["removed"] += 1
            if r[i] > r_min:
                heapq.heappush(heap, (value(i, r[i]), i))
    heap = [(_neg(value(i, r[i] + 1)), i) for i in range(n) if r[i] < r_max]
    heapq.heapify(heap)
    while heap and budget - spent > 0:
        _, i = heapq.heappop(heap)
        if c[i] > budget - spent:
            continue  # the remaining budget only shrinks: this layer can never be grown again
        r[i] += 1
        spent += int(c[i])
        steps["added"] += 1
        if r[i] < r_max:
            heapq.heappush(heap, (_neg(value(i, r[i] + 1)), i))
    tol = int(c.min())
    for _ in range(4 * n):  # swaps: only when the cheapest layers are saturated at r_max
        gap = budget - spent
        if abs(gap) <= tol:
            break
        grow = np.flatnonzero(r < r_max)
        shrink = np.flatnonzero(r > r_min)
        best = None
        for b in grow:  # single add, possibly overshooting by at most tol
            new_gap = gap - int(c[b])
            if abs(new_gap) < abs(gap):
                key = (abs(new_gap), -survival[b, r[b] + 1] / c[b])
                best = min(best, (key, -1, int(b))) if best else (key, -1, int(b))
        for a in shrink:
            for b in grow:
                if a == b:
                    continue
                new_gap = gap + int(c[a]) - int(c[b])
                if abs(new_gap) < abs(gap):
                    key = (abs(new_gap), survival[a, r[a]] / c[a] - survival[b, r[b] + 1] / c[b])
                    best = min(best, (key, int(a), int(b))) if best else (key, int(a), int(b))
        if best is None:
            break
        _, a, b = best
        if a >= 0:
            r[a] -= 1
            spent -= int(c[a])
            steps["swapped"] += 1
        else:
            steps["added"] += 1
        r[b] += 1
        spent += int(c[b])
    return r, steps


def _neg(key: Tuple[float, float]) -> Tuple[float, float]:
    return (-key[0], -key[1])


# ---------------------------------------------------------------------------- allocation
def allocate_ranks(gaps: Mapping[str, float], costs: Mapping[str, int], budget: int, r_min: int,
                   r_max: int, *, gamma: float = 1.0, sigma: float = 0.1,
                   alpha_prior: Tuple[float, float] = (1.0, 0.1), n_chains: int = 4,
                   n_sweeps: int = 300, burn_in: int = 100, truncation: int = 0,
                   summary: str = "mean", level: float = 0.9, seed: int = 0,
                   calibration: Optional[Dict[str, float]] = None) -> RankAllocation:
    """Turn per-module gaps into a rank map that spends ``budget`` parameters (within min_i c_i).

    Args:
        gaps: module name -> gap D_i >= 0 (per Linear; use :func:`expand` for per-block gaps).
        costs: module name -> parameters per unit of rank, d_in + d_out (:func:`costs_from_model`).
        budget: B, trainable LoRA parameters to spend.
        r_min, r_max: allowed ranks (0 = frozen).
        gamma: likelihood exponent in log D ~ N(log beta + gamma log(1 + r), sigma^2).
        sigma: likelihood standard deviation on log D.
        alpha_prior: (a, b) of the Gamma prior on the IBP concentration.
        n_chains, n_sweeps, burn_in: MCMC chains, kept sweeps per chain, discarded sweeps.
        truncation: dish columns K (0: max(2 * r_max, 4 * ceil(budget / sum c), 32)).
        summary: "mean" (rounded posterior mean) or "mode" before the repair.
        level: probability mass of the reported intervals.
        seed: sampler seed.
        calibration: keyword arguments for :func:`ibp.rank_posterior.calibrate_beta`.
    """
    t0 = time.perf_counter()
    names, d, c = _validate(gaps, costs, budget, r_min, r_max)
    if summary not in SUMMARIES:
        raise ValueError(f"summary={summary!r} is not allowed; choose one of {SUMMARIES}")
    if not truncation:
        # K >= 2 r_max and >= 4x the mean rank the budget implies, so alpha / K stays <~ 1/4 and
        # the finite model stays close to the IBP it approximates.
        truncation = max(2 * int(r_max), 4 * math.ceil(budget / c.sum()), 32)
    post = sample_rank_posterior(
        d, costs=c, budget=float(budget), n_sweeps=n_sweeps, burn_in=burn_in,
        calibration=calibration, gamma=gamma, sigma=sigma, alpha_prior=alpha_prior,
        r_lo=int(r_min), r_hi=int(r_max), truncation=truncation, n_chains=n_chains, seed=seed)
    t_sample = time.perf_counter() - t0
    mean = post.mean()
    start = np.rint(mean) if summary == "mean" else post.mode()
    start = np.clip(start, r_min, r_max).astype(np.int64)
    ranks, steps = repair_budget(start, c, int(budget), post.survival(), int(r_min), int(r_max),
                                 tie_break=mean)
    trainable = int(np.dot(c, ranks))
    tol = int(c.min())
    if abs(trainable - budget) > tol:
        warnings.warn(f"rank map spends {trainable} parameters, more than {tol} away from the budget "
                      f"{budget}: no single-unit move or swap gets closer", RuntimeWarning)
    return _build_allocation(names, d, c, post, ranks, int(budget), trainable, tol, int(r_min),
                             int(r_max), level, start, steps,
                             {"sample_s": t_sample, "total_s": time.perf_counter() - t0})


def _build_allocation(names: List[str], d: np.ndarray, c: np.ndarray, post: RankPosterior,
                      ranks: np.ndarray, budget: int, trainable: int, tol: int, r_min: int,
                      r_max: int, level: float, start: np.ndarray, steps: Dict[str, int],
                      timing: Dict[str, float]) -> RankAllocation:
    mean, sd, interval = post.mean(), post.sd(), post.interval(level)
    rhat, ess = post.rhat(), post.ess()
    prior = {
        "model": "finite IBP (beta-Bernoulli, K columns) x Gaussian power law on log gap",
        "alpha_prior": list(post.alpha_prior) if post.alpha_prior else None,
        "alpha_posterior_mean": float(post.alpha.mean()),
        "log_beta": post.log_beta,
        "beta": math.exp(post.log_beta),
        "gamma": post.gamma,
        "sigma": post.sigma,
        "truncation": post.truncation,
    }
    diagnostics = dict(post.diagnostics())
    diagnostics.update({
        "rhat": dict(zip(names, rhat.tolist())),
        "ess": dict(zip(names, ess.tolist())),
        "expected_cost": post.expected_cost(c),
        "calibration": post.calibration,
        "budget_calibrated": bool(post.calibration) and abs(post.calibration[-1]["rel_error"]) <= 0.05,
        "rounded_cost": int(np.dot(c, start)),
        "repair_steps": steps,
        "timing_s": timing,
    })
    return RankAllocation(
        rank_map={n: int(r) for n, r in zip(names, ranks)},
        intervals={n: (int(lo), int(hi)) for n, (lo, hi) in zip(names, interval)},
        posterior_mean={n: float(v) for n, v in zip(names, mean)},
        posterior_sd={n: float(v) for n, v in zip(names, sd)},
        gaps={n: float(v) for n, v in zip(names, d)},
        costs={n: int(v) for n, v in zip(names, c)},
        budget=budget, trainable=trainable, tolerance=tol, r_min=r_min, r_max=r_max,
        level=float(level), prior=prior, diagnostics=diagnostics)


def allocate_from_config(gaps: Mapping[str, float], costs: Mapping[str, int],
                         config: RankConfig) -> RankAllocation:
    """:func:`allocate_ranks` with every option taken from a :class:`RankConfig`.

    Args:
        gaps: module name -> gap (already restricted to ``config.targets``).
        costs: module name -> d_in + d_out.
        config: stage-2 rank options.
    """
    return allocate_ranks(
        gaps, costs, config.budget, config.r_min, config.r_max, gamma=config.gamma,
        sigma=config.sigma, alpha_prior=config.alpha_prior, n_chains=config.n_chains,
        n_sweeps=config.n_sweeps, burn_in=config.burn_in, truncation=config.truncation,
        summary=config.summary, seed=config.seed)


# ---------------------------------------------------------------------------- per-block -> per-Linear
def _is_prefix(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def expand(gaps: Mapping[str, float], module_names: Iterable[str]) -> Dict[str, float]:
    """Map gaps keyed by blocks (or any module prefix) onto Linear module names.

    Each module takes the gap of the longest key that is a dotted prefix of its name, so
    ``layers.2.blocks.5`` covers ``layers.2.blocks.5.attn.qkv`` ... ``.mlp.fc2`` and an exact
    per-Linear key overrides its block. A module with no matching key (Swin's
    ``layers.{i}.downsample.reduction`` when gaps are per block) inherits the gap of the closest
    earlier module in ``module_names``: pass names in forward order (``model.named_modules()``
    order), so a patch-merging layer reads the gap of the block whose output it consumes.

    Args:
        gaps: key -> gap; keys are module-name prefixes such as ``layers.{i}.blocks.{j}``.
        module_names: Linear module names, in forward order.

    Returns:
        module name -> gap, in the order of ``module_names``.
    """
    keys = sorted(gaps, key=len, reverse=True)
    out: Dict[str, float] = {}
    previous: Optional[float] = None
    for name in module_names:
        match = next((k for k in keys if _is_prefix(k, name)), None)
        if match is not None:
            previous = out[name] = float(gaps[match])
        elif previous is not None:
            out[name] = previous
        else:
            raise ValueError(f"no gap for module {name!r}: no key of gaps is a prefix of it and no "
                             f"earlier module has one (keys: {', '.join(sorted(gaps)[:5])}...)")
    return out


def costs_from_model(model: Any, targets: str = "all") -> Dict[str, int]:
    """Per-unit-rank LoRA cost d_in + d_out of each targeted ``nn.Linear`` of a torch model.

    Args:
        model: a torch module (e.g. the timm Swin body); only ``nn.Linear`` children count.
        targets: a preset of :data:`orca.adapters.targets.TARGET_PRESETS` (the one table stage 3 reads too).
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: int(linears[n].in_features + linears[n].out_features)
            for n in select_targets(linears, targets)}


def swin_linear_costs(embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                      mlp_ratio: float = 4.0, targets: str = "all") -> Dict[str, int]:
    """d_in + d_out of every Swin Linear, from the architecture alone (timm module names and order).

    timm's Swin (v1, timm >= 0.9) puts the patch merging at the start of stage i >= 1
    (``layers.{i}.downsample.reduction``: 4 C_(i-1) -> 2 C_(i-1)); blocks have qkv (C -> 3C),
    proj (C -> C), fc1 (C -> r C), fc2 (r C -> C). Swin-B: embed 128, depths (2, 2, 18, 2).

    Args:
        embed_dim: channels of stage 0.
        depths: blocks per stage.
        mlp_ratio: MLP hidden width / channels.
        targets: a preset of :data:`orca.adapters.targets.TARGET_PRESETS`.
    """
    costs: Dict[str, int] = {}
    for i, depth in enumerate(depths):
        dim = embed_dim * 2 ** i
        if i > 0:
            prev = dim // 2
            costs[f"layers.{i}.downsample.reduction"] = 4 * prev + 2 * prev
        hidden = int(dim * mlp_ratio)
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}"
            costs[f"{pre}.attn.qkv"] = dim + 3 * dim
            costs[f"{pre}.attn.proj"] = 2 * dim
            costs[f"{pre}.mlp.fc1"] = dim + hidden
            costs[f"{pre}.mlp.fc2"] = hidden + dim
    return {n: costs[n] for n in select_targets(costs, targets)}


# ---------------------------------------------------------------------------- empirical Bayes
@dataclass
class PowerLawFit:
    """Least-squares fit of log D = log beta + gamma log(1 + r) + N(0, sigma^2).

    Attributes:
        gamma: exponent (> 0 when rank grows with gap; the allocator requires that).
        log_beta: intercept.
        sigma: residual standard deviation (ddof = 2), a data-driven choice of the likelihood sigma.
        gamma_se: standard error of gamma.
        n: number of points.
    """

    gamma: float
    log_beta: float
    sigma: float
    gamma_se: float
    n: int


_PairData = Union[Sequence[Tuple[float, float]], Mapping[Any, Tuple[float, float]]]


def fit_gamma(data: _PairData) -> PowerLawFit:
    """Empirical-Bayes fit of the likelihood's power law from a rank sweep, by least squares on logs.

    When it applies: each point pairs a gap D with the "knee" rank r (the smallest rank past which
    the task metric stops improving) of the same thing, measured with the same gap metric and
    backbone as the gaps you will allocate for: per task (one whole-model gap and one knee from a
    uniform-rank sweep, e.g. Darcy vs CIFAR-100) or per layer (a per-layer rank sweep). It fits the
    model's own regression, log D on log(1 + r), so gamma, beta and sigma plug straight into
    :func:`allocate_ranks` (beta is re-set by the budget anyway). It does not apply across gap
    metrics, nor when all knees share one rank (the slope is then undefined).

    Args:
        data: (gap, knee_rank) pairs, or a mapping name -> (gap, knee_rank); gaps > 0, ranks >= 0.
    """
    pairs = list(data.values()) if isinstance(data, Mapping) else list(data)
    if len(pairs) < 3:
        raise ValueError(f"fit_gamma needs at least 3 (gap, knee_rank) points, got {len(pairs)}")
    arr = np.asarray(pairs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"fit_gamma needs (gap, knee_rank) pairs, got array of shape {arr.shape}")
    gaps, ranks = arr[:, 0], arr[:, 1]
    if not np.isfinite(arr).all() or (gaps <= 0).any() or (ranks < 0).any():
        raise ValueError("fit_gamma needs finite gaps > 0 and knee ranks >= 0")
    x, y = np.log1p(ranks), np.log(gaps)
    if np.ptp(x) == 0:
        raise ValueError("all knee ranks are equal: the exponent gamma is not identifiable")
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    dof = max(len(x) - 2, 1)
    sigma = float(math.sqrt(float(resid @ resid) / dof))
    gamma_se = sigma / math.sqrt(float(np.sum((x - x.mean()) ** 2)))
    return PowerLawFit(gamma=float(coef[1]), log_beta=float(coef[0]), sigma=sigma,
                       gamma_se=gamma_se, n=len(x))
