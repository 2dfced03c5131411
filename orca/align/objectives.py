"""Stage-1 alignment objectives behind one interface, in the ``alignment objective`` registry.

Every objective is ORCA's loss shape (stage 1): the target set is split by its labels
(k-means clusters for regression targets, classes otherwise), each cluster is compared with the
whole source set, and the per-cluster values are summed with class-frequency weights
w_k = n_k / n. Only what "compared" means differs:

    otdd  OTDD(cluster as a single-label set, labelled source)  -- ORCA's default
    mmd   unbiased multi-kernel MMD^2(cluster, source features)  -- ORCA's alternative
    l2    ||mean(cluster) - mean(source)||^2                    -- a plain baseline

Clusters with fewer than ``min_cluster_size`` (default 2) members are skipped and their weight is
dropped, not redistributed, as ORCA does (``if feats.shape[0] > 1``): a single point has no
unbiased MMD and no meaningful class-conditional cloud.

Usage::

    objective = build_objective("otdd")   # microsoft/otdd's quantity in ORCA's call
    loss = objective(target_feats, clusters, source_feats, source_labels)   # scalar, has grad
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from datasets.registry import Registry
from orca.align.mmd import DEFAULT_MULTIPLIERS, mean_l2_per_cluster, mmd2_per_cluster
from orca.align.checks import check_features, check_labels
from orca.align.otdd import OTDD
from orca.align.sinkhorn import SinkhornOptions

OBJECTIVES = Registry("alignment objective")
WEIGHTINGS = ("frequency", "uniform")


class AlignmentObjective(ABC):
    """Base class: validation, cluster weighting and the weighted sum; subclasses give per-cluster values.

    Args:
        weighting: ``"frequency"`` (ORCA: w_k = n_k / n) or ``"uniform"`` (w_k = 1 / K).
        min_cluster_size: clusters smaller than this are skipped.
    """

    name = "base"
    needs_source_labels = False

    def __init__(self, weighting: str = "frequency", min_cluster_size: int = 2):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
        if min_cluster_size < 1:
            raise ValueError(f"min_cluster_size={min_cluster_size} must be >= 1")
        self.weighting = weighting
        self.min_cluster_size = min_cluster_size

    @abstractmethod
    def _cluster_values(self, target_feats: Tensor, index: Tensor, n_clusters: int, source_feats: Tensor,
                        source_labels: Optional[Tensor]) -> Tensor:
        """Values ``[K]`` for clusters ``index [n]`` in 0..K-1 (validated, every cluster kept)."""

    def per_cluster(self, target_feats, target_labels, source_feats, source_labels=None) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-cluster values and weights (for logging); skipped clusters are left out.

        Args:
            target_feats: ``[n, d]`` (may require grad).
            target_labels: ``[n]`` integer cluster ids.
            source_feats: ``[m, d]``.
            source_labels: ``[m]`` integer labels (required by ``otdd``).

        Returns:
            ``(values [K'], cluster_ids [K'], weights [K'])``.
        """
        source_feats = check_features("source_feats", source_feats)
        target_feats = check_features("target_feats", target_feats, source_feats.shape[1], "source_feats")
        labels = check_labels("target_labels", target_labels, target_feats.shape[0], "target_feats",
                              target_feats.device)
        if self.needs_source_labels:
            source_labels = check_labels("source_labels", source_labels, source_feats.shape[0], "source_feats",
                                         source_feats.device)
        ids, index, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
        keep = counts >= self.min_cluster_size
        if not bool(keep.any()):
            raise ValueError(f"target_labels: every cluster has fewer than min_cluster_size="
                             f"{self.min_cluster_size} members (sizes {counts.tolist()})")
        if not bool(keep.all()):
            rows = keep[index]
            target_feats, labels = target_feats[rows], labels[rows]
            _, index = torch.unique(labels, sorted=True, return_inverse=True)
        k = int(keep.sum())
        weights = (counts[keep].to(target_feats.dtype) / counts.sum() if self.weighting == "frequency"
                   else torch.full((k,), 1.0 / ids.numel(), dtype=target_feats.dtype, device=target_feats.device))
        values = self._cluster_values(target_feats, index, k, source_feats, source_labels)
        return values, ids[keep], weights

    def __call__(self, target_feats, target_labels, source_feats, source_labels=None) -> Tensor:
        """Weighted sum over target clusters of the per-cluster discrepancy to the source.

        Args:
            target_feats: ``[n, d]`` (may require grad).
            target_labels: ``[n]`` integer cluster ids.
            source_feats: ``[m, d]``.
            source_labels: ``[m]`` integer labels (required by ``otdd``, ignored by the others).

        Returns:
            0-dim tensor, differentiable w.r.t. ``target_feats``.
        """
        values, _, weights = self.per_cluster(target_feats, target_labels, source_feats, source_labels)
        return (values * weights).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@OBJECTIVES.register("otdd")
class OTDDObjective(AlignmentObjective):
    """ORCA's objective: OTDD of each cluster (one label) vs the labelled source, batched and cached.

    The defaults compute what microsoft/otdd computes in ORCA's call (see ``orca.align.otdd``).

    Args:
        inner: ``"sinkhorn"`` (microsoft/otdd's "exact"), ``"exact"`` (LP) or ``"gaussian"`` label distance.
        reg: outer entropic regularisation (0.1 in ORCA).
        cost: ``"half"`` (microsoft/otdd's (|x - x'|^2 + W) / 2) or ``"full"`` (the paper's |x - x'|^2 + W).
        debiased: Sinkhorn divergence (ORCA: True).
        inner_reg: eps of the sinkhorn label distances (microsoft/otdd: 0.1).
        inner_max_samples: per-class cap in the sinkhorn/exact label distances (None = all).
        seed: seed of that cap's subsample.
        schedule: ``"fixed"`` (geomloss' annealing, microsoft/otdd's numbers) or ``"converged"``.
        max_iter, rtol: settings of the ``"converged"`` schedule (see :class:`SinkhornOptions`).
        inner_grad: also differentiate the cluster-to-class label distances (ORCA: False).
        weighting, min_cluster_size: see :class:`AlignmentObjective`.
        inner_threads: worker threads for the exact (LP) label pairs (None = one per usable CPU).
    """

    name = "otdd"
    needs_source_labels = True

    def __init__(self, inner: str = "sinkhorn", reg: float = 0.1, cost: str = "half", debiased: bool = True,
                 inner_reg: float = 0.1, inner_max_samples: Optional[int] = None, seed: int = 0,
                 schedule: str = "fixed", max_iter: int = 2000, rtol: float = 1e-4, inner_grad: bool = False, weighting: str = "frequency",
                 min_cluster_size: int = 2, inner_threads: Optional[int] = None):
        super().__init__(weighting, min_cluster_size)
        self.otdd = OTDD(inner=inner, reg=reg, cost=cost, debiased=debiased, inner_reg=inner_reg,
                         inner_max_samples=inner_max_samples, seed=seed,
                         sinkhorn=SinkhornOptions(schedule=schedule, max_iter=max_iter, rtol=rtol), inner_grad=inner_grad,
                         inner_threads=inner_threads)

    def _cluster_values(self, target_feats, index, n_clusters, source_feats, source_labels):
        values, _ = self.otdd.per_cluster(target_feats, index, source_feats, source_labels)
        return values


@OBJECTIVES.register("mmd")
class MMDObjective(AlignmentObjective):
    """Unbiased multi-kernel MMD^2 of each cluster vs the source features (labels unused).

    Args:
        multipliers: Gaussian bandwidth multipliers around the pooled median heuristic.
        max_median_samples, seed: subsample for the median.
        weighting, min_cluster_size: see :class:`AlignmentObjective`.
    """

    name = "mmd"

    def __init__(self, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, max_median_samples: int = 1024,
                 seed: int = 0, weighting: str = "frequency", min_cluster_size: int = 2):
        if min_cluster_size < 2:
            raise ValueError(f"min_cluster_size={min_cluster_size}: the unbiased MMD needs clusters of >= 2")
        super().__init__(weighting, min_cluster_size)
        self.multipliers = tuple(multipliers)
        self.max_median_samples = max_median_samples
        self.seed = seed

    def _cluster_values(self, target_feats, index, n_clusters, source_feats, source_labels):
        if source_feats.shape[0] < 2:
            raise ValueError("source_feats needs >= 2 samples for the unbiased MMD estimator")
        return mmd2_per_cluster(target_feats, index, n_clusters, source_feats, multipliers=self.multipliers,
                                max_median_samples=self.max_median_samples, seed=self.seed)


@OBJECTIVES.register("l2")
class L2Objective(AlignmentObjective):
    """Squared distance between each cluster's mean and the source mean (labels unused).

    Args:
        weighting, min_cluster_size: see :class:`AlignmentObjective`.
    """

    name = "l2"

    def _cluster_values(self, target_feats, index, n_clusters, source_feats, source_labels):
        return mean_l2_per_cluster(target_feats, index, n_clusters, source_feats)


def build_objective(name: str, **kwargs) -> AlignmentObjective:
    """Instantiate the registered objective ``name`` with its options.

    Args:
        name: a name in :data:`OBJECTIVES` (``otdd``, ``mmd``, ``l2``).
        **kwargs: that objective's constructor options.
    """
    return OBJECTIVES.get(name)(**kwargs)


__all__ = ["OBJECTIVES", "AlignmentObjective", "L2Objective", "MMDObjective", "OTDDObjective", "build_objective"]
