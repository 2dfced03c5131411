"""Stage-1 options: how the target embedder is aligned to the source feature distribution."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from orca.align.label_distances import INNER_METHODS
from orca.align.objectives import OBJECTIVES
from orca.schema import ConfigError, check_choice, check_positive


@dataclass
class AlignConfig:
    """ORCA's embedder alignment (stage 1). Defaults are ORCA's Darcy settings."""

    mode: str = field(default="train", metadata={"help": "train (optimise the objective) | source_init (copy the pretrained patch embedding only; the ablation)"})
    objective: str = field(default="otdd", metadata={"help": "a registered alignment objective: otdd | mmd | l2 (python -m orca list objectives)"})
    source: str = field(default="cifar10", metadata={"help": "labelled source task for source features (cifar10, or fractal offline)"})
    source_options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "extra options of the source task (e.g. fractal num_points, cifar10 download=true)"})
    n_source: int = field(default=5000, metadata={"help": "source samples through the pretrained patch embedding"})
    n_target: Optional[int] = field(default=None, metadata={"help": "target training samples used (None = all)"})
    n_clusters: int = field(default=10, metadata={"help": "k-means clusters that label regression targets"})
    kmeans_n_init: int = field(default=10, metadata={"help": "k-means restarts (seeded with the run seed) when labelling regression targets"})
    epochs: int = field(default=60, metadata={"help": "alignment epochs"})
    steps_per_epoch: int = field(default=1, metadata={"help": "optimizer steps per epoch (ORCA: 1)"})
    lr: Optional[float] = field(default=None, metadata={"help": "embedder learning rate (None = 10 x train.lr, ORCA)"})
    entreg: float = field(default=0.1, metadata={"help": "entropic regularisation of the outer OT"})
    inner: str = field(default="sinkhorn", metadata={"help": "sinkhorn (microsoft/otdd's 'exact', ORCA) | exact (LP) | gaussian: label-to-label distance in OTDD"})
    objective_options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "extra constructor options of the objective (e.g. otdd cost=full for the paper's cost, inner_max_samples, mmd multipliers, min_cluster_size)"})
    batch_size: int = field(default=64, metadata={"help": "batch size for computing features"})
    cache_dir: str = field(default="features", metadata={"help": "source-feature cache, relative to task.data_root"})

    def __post_init__(self):
        check_choice("align.mode", self.mode, ("train", "source_init"))
        check_choice("align.objective", self.objective, OBJECTIVES.names())
        check_choice("align.inner", self.inner, INNER_METHODS)
        for name in ("n_source", "n_clusters", "kmeans_n_init", "epochs", "steps_per_epoch", "batch_size"):
            check_positive(f"align.{name}", getattr(self, name))
        check_positive("align.entreg", self.entreg)
        if self.n_target is not None and self.n_target <= 0:
            raise ConfigError(f"align.n_target={self.n_target} must be > 0 or null")
        if self.lr is not None:
            check_positive("align.lr", self.lr)
        if not self.source or not isinstance(self.source, str):
            raise ConfigError(f"align.source={self.source!r} must name a registered classification task (cifar10, fractal)")
