"""The optimizer and learning-rate schedule a config asks for, shared by both training loops.

Why here: stage 0 (``orca.pretrain``) and stage 3 (``orca.train``) build their optimizer from the
same ``train`` keys and follow ORCA's schedule; neither stage imports the other, so the pieces live
below both.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from orca.adapters.optim import build_optimizer as make_optimizer
from orca.config import ExperimentConfig


def warmup_linear_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """ORCA's schedule: linear warm-up to the peak, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(cfg: ExperimentConfig, groups: List[Dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (AdamW fused on CUDA, SGD, or paged AdamW for QLoRA)."""
    t = cfg.train
    if t.optimizer == "paged_adamw" and device.type != "cuda":
        raise RuntimeError("paged AdamW (train.optimizer=paged_adamw) needs a CUDA device")
    return make_optimizer(groups, t.optimizer, lr=t.lr, betas=t.betas, momentum=t.momentum)
