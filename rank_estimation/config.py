"""Typed options of stage 2: per-layer features -> gaps -> P(r | D) -> rank map.

Why a dataclass with ``__post_init__`` checks: a YAML typo or an impossible setting (r_min above
r_max, burn-in longer than the run) should fail when the config is loaded, naming the field, the
value and what is allowed, not minutes into sampling. The gap metric name is only checked to be a
non-empty string here; the gap-metric registry validates it where it is built.

:class:`Stage2Config` is orca core's :class:`orca.config.ExperimentConfig` plus the ``rank``
section: orca core knows nothing of stage 2, and stage 2 adds its section on top.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from orca.adapters.targets import TARGET_PRESETS, check_preset
from orca.config import ExperimentConfig
from orca.schema import ConfigError, from_dict
from rank_estimation.gaps import GAP_METRICS

__all__ = ["RankConfig", "Stage2Config", "SUMMARIES", "POOLS", "DEFAULT_METRICS"]

SUMMARIES = ("mean", "mode")
#: How a block's token grid becomes feature rows (rank_estimation.features).
POOLS = ("mean", "tokens")
#: The gap metrics measured unless rank.metrics says otherwise (any of rank_estimation.gaps.GAP_METRICS
#: may be named); otdd uses k-means labels on regression targets.
DEFAULT_METRICS = ("mmd", "sliced_wasserstein", "sinkhorn", "otdd", "pad")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"RankConfig.{name}={value!r} is not allowed; expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RankConfig:
    """Options of stage 2: feature capture, gap metrics, and :func:`rank_estimation.allocate.allocate_ranks`."""

    budget: int = field(default=1_600_000, metadata={
        "help": "trainable LoRA parameters to spend, sum_i r_i (d_in_i + d_out_i); the default is "
                "about uniform r=8 on all 99 Swin-B Linear layers (1,583,104)"})
    r_min: int = field(default=1, metadata={"help": "smallest rank a layer may get (0 = may be frozen)"})
    r_max: int = field(default=64, metadata={"help": "largest rank a layer may get"})
    gamma: float = field(default=1.0, metadata={
        "help": "power-law exponent in log D ~ N(log beta + gamma log(1 + r), sigma^2); 1 = rank "
                "proportional to gap; fit it with rank_estimation.allocate.fit_gamma"})
    alpha_prior: Tuple[float, float] = field(default=(1.0, 0.1), metadata={
        "help": "(shape a, rate b) of the Gamma prior on the IBP concentration alpha (prior mean a/b)"})
    sigma: float = field(default=0.1, metadata={
        "help": "likelihood sd on log gap: small follows the gaps closely, large returns the IBP prior "
                "(0.1 gives log(1 + r) a slope of about 0.8 / gamma in log D on Swin-B profiles)"})
    n_chains: int = field(default=4, metadata={"help": "independent MCMC chains (split R-hat needs them)"})
    n_sweeps: int = field(default=300, metadata={"help": "kept sweeps per chain after burn-in"})
    burn_in: int = field(default=100, metadata={"help": "discarded sweeps per chain before the kept ones"})
    truncation: int = field(default=0, metadata={
        "help": "dish columns K of the finite IBP; 0 picks max(2 r_max, 4 x budget mean rank, 32)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler's numpy Generator"})
    targets: str = field(default="all", metadata={
        "help": f"which Linear modules get a rank: a preset of orca.adapters.targets ({' | '.join(TARGET_PRESETS)}), "
                "the same module set as adapter.targets of that name"})
    summary: str = field(default="mean", metadata={
        "help": f"posterior summary turned into the rank before the budget repair: one of {SUMMARIES}"})
    gap_metric: str = field(default="mmd", metadata={
        "help": "the gap metric whose per-block values become D_i (measured even when not in metrics)"})
    metrics: Tuple[str, ...] = field(default=DEFAULT_METRICS, metadata={
        "help": "gap metrics measured at every layer for gaps.json / gaps.png (python -m orca list gaps)"})
    n_source: int = field(default=5000, metadata={
        "help": "source images through the pretrained patch embedding and the body (ORCA: 5,000)"})
    n_target: Optional[int] = field(default=None, metadata={
        "help": "N target training inputs, drawn uniformly by the run's seed, through the target embedder and the body (None = all)"})
    source: Optional[str] = field(default=None, metadata={
        "help": "labelled source task (cifar10, fractal); None = align.source, the set stage 1 aligned to"})
    source_options: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "options of the source task; None = align.source_options when source is None, else {}"})
    n_boot: int = field(default=20, metadata={
        "help": "bootstrap resamples per (layer, metric) for the intervals; 0 = point estimates only "
                "(each resample costs one more metric evaluation per layer)"})
    boot_metrics: Optional[Tuple[str, ...]] = field(default=None, metadata={
        "help": "metrics that get bootstrap intervals (None = all measured); the others report "
                "lo = hi = value. otdd solves 190 label pairs per evaluation, so leaving it out saves most "
                "of the bootstrap time"})
    ci_level: float = field(default=0.95, metadata={"help": "coverage of the bootstrap intervals"})
    pool: str = field(default="mean", metadata={
        "help": f"one of {POOLS}: mean = one token-averaged row per image (ORCA's features); "
                "tokens = token rows (see tokens_per_sample)"})
    tokens_per_sample: int = field(default=16, metadata={
        "help": "with pool=tokens, seeded random tokens kept per image and block (0 = all: the "
                "metrics are O(rows^2), so all tokens of thousands of images do not fit)"})
    standardize: bool = field(default=True, metadata={
        "help": "divide each layer's features by the source RMS spread, so gaps of layers with "
                "different activation scales are comparable"})
    metric_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "per-metric options, e.g. {sinkhorn: {blur: 0.1}, pad: {max_samples: 1000}}"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass of the feature capture"})
    allocate: bool = field(default=True, metadata={
        "help": "allocate ranks under the budget and write the rank map; false measures the gap profile "
                "only (gaps.json, gaps.png), also for a task whose gap is unresolved at every block (the "
                "source distribution itself); a later run with rank.gaps_from allocates from it"})
    gaps_from: Optional[str] = field(default=None, metadata={
        "help": "stage-2 run directory whose gaps.json is reused: no feature capture or gap measurement, "
                "only the allocation at this run's budget/prior (same task, body, weights and target "
                "embedder required)"})

    def __post_init__(self) -> None:
        if isinstance(self.alpha_prior, list):  # YAML gives lists
            self.alpha_prior = tuple(self.alpha_prior)
        if isinstance(self.metrics, (list, str)):  # YAML gives lists; one name is a metric list too
            self.metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        if isinstance(self.boot_metrics, (list, str)):
            self.boot_metrics = ((self.boot_metrics,) if isinstance(self.boot_metrics, str)
                                 else tuple(self.boot_metrics))
        for name in ("budget", "r_min", "r_max", "n_chains", "n_sweeps", "burn_in", "truncation", "seed",
                     "n_source", "n_boot", "tokens_per_sample", "batch_size"):
            if not _is_int(getattr(self, name)):
                raise _bad(name, getattr(self, name), "an integer")
        if self.budget <= 0:
            raise _bad("budget", self.budget, "a positive number of parameters")
        if self.r_min < 0:
            raise _bad("r_min", self.r_min, "an integer >= 0")
        if self.r_max < max(self.r_min, 1):
            raise _bad("r_max", self.r_max, f"an integer >= max(r_min={self.r_min}, 1)")
        for name in ("gamma", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise _bad(name, value, "a finite number > 0")
        prior = self.alpha_prior
        if (not isinstance(prior, tuple) or len(prior) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and v > 0 for v in prior)):
            raise _bad("alpha_prior", prior, "a pair (a, b) of finite numbers > 0")
        if self.n_chains < 1:
            raise _bad("n_chains", self.n_chains, "an integer >= 1")
        if self.n_sweeps < 4:
            raise _bad("n_sweeps", self.n_sweeps, "an integer >= 4 (split R-hat halves each chain)")
        if self.burn_in < 0:
            raise _bad("burn_in", self.burn_in, "an integer >= 0")
        if self.truncation != 0 and self.truncation < self.r_max:
            raise _bad("truncation", self.truncation, f"0 (auto) or an integer >= r_max={self.r_max}")
        check_preset("rank.targets", self.targets)
        if self.summary not in SUMMARIES:
            raise _bad("summary", self.summary, f"one of {SUMMARIES}")
        if not isinstance(self.gap_metric, str) or not self.gap_metric:
            raise _bad("gap_metric", self.gap_metric, "a non-empty metric name")
        if not isinstance(self.metrics, tuple) or not all(isinstance(m, str) and m for m in self.metrics):
            raise _bad("metrics", self.metrics, "a list of gap-metric names")
        if len(set(self.metrics)) != len(self.metrics):
            raise _bad("metrics", self.metrics, "a list without repeated names")
        for key, names in (("gap_metric", (self.gap_metric,)), ("metrics", self.metrics)):
            for name in names:
                if name not in GAP_METRICS:
                    raise ConfigError(f"rank.{key}: {GAP_METRICS.unknown_message(name)}")
        if self.boot_metrics is not None:
            measured = set(self.metrics) | {self.gap_metric}
            if not isinstance(self.boot_metrics, tuple) or any(m not in measured for m in self.boot_metrics):
                raise _bad("boot_metrics", self.boot_metrics, f"None or a list of measured metrics "
                           f"(rank.metrics + rank.gap_metric: {sorted(measured)})")
        if self.n_source < 2:
            raise _bad("n_source", self.n_source, "an integer >= 2 (a gap compares two samples)")
        if self.n_target is not None and (not _is_int(self.n_target) or self.n_target < 2):
            raise _bad("n_target", self.n_target, "None (all) or an integer >= 2")
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise _bad("source", self.source, "None (= align.source) or a registered task name")
        if self.source_options is not None and not isinstance(self.source_options, dict):
            raise _bad("source_options", self.source_options, "None or a mapping of task options")
        if self.n_boot < 0:
            raise _bad("n_boot", self.n_boot, "an integer >= 0")
        if isinstance(self.ci_level, bool) or not isinstance(self.ci_level, (int, float)) or not (
                0 < self.ci_level < 1):
            raise _bad("ci_level", self.ci_level, "a number in (0, 1)")
        if self.pool not in POOLS:
            raise _bad("pool", self.pool, f"one of {POOLS}")
        if self.tokens_per_sample < 0:
            raise _bad("tokens_per_sample", self.tokens_per_sample, "an integer >= 0 (0 = all tokens)")
        if self.batch_size < 1:
            raise _bad("batch_size", self.batch_size, "an integer >= 1")
        if not isinstance(self.standardize, bool):
            raise _bad("standardize", self.standardize, "true or false")
        if not isinstance(self.metric_kwargs, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.metric_kwargs.items()):
            raise _bad("metric_kwargs", self.metric_kwargs, "a mapping metric name -> mapping of options")
        if self.gaps_from is not None and (not isinstance(self.gaps_from, str) or not self.gaps_from):
            raise _bad("gaps_from", self.gaps_from, "None (measure the gaps) or a stage-2 run directory")
        if not isinstance(self.allocate, bool):
            raise _bad("allocate", self.allocate, "true or false")
        if not self.allocate and self.gaps_from is not None:
            raise _bad("allocate", self.allocate, "true with gaps_from (a run that reads a profile only allocates)")

    def to_dict(self) -> Dict[str, Any]:
        """Plain-dict form (tuples as lists) for YAML/JSON run records."""
        out = asdict(self)
        out["alpha_prior"] = list(self.alpha_prior)
        out["metrics"] = list(self.metrics)
        out["boot_metrics"] = None if self.boot_metrics is None else list(self.boot_metrics)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RankConfig":
        """Build from a dict (the ``rank`` section); unknown keys raise, naming the closest field."""
        return from_dict(cls, values, "rank")


@dataclass
class Stage2Config(ExperimentConfig):
    """Every section of orca core's schema plus ``rank``: what stage 2 reads, and (stage 2 being the
    one stage above orca core) the full schema the entry points load."""

    rank: RankConfig = field(default_factory=RankConfig)
