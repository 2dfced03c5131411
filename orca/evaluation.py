"""Scoring a model on a split: the evaluation both training loops share.

Why here: stage 0 (``orca.pretrain``) validates its body and stage 3 (``orca.train``) validates and
tests the fine-tuned model with the same per-sample metric and loss bookkeeping; neither stage
imports the other.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import DataLoader

from datasets.progress import progress
from datasets.registry import TaskData


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, task: TaskData, device: torch.device,
             autocast, desc: str = "eval") -> Dict[str, float]:
    """Mean per-sample error (``task.metric``) and mean loss over ``loader``."""
    model.eval()
    errors, loss_sum, n = [], 0.0, 0
    for x, y in progress(loader, desc=desc, unit="batch", leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        out = out.float()
        errors.append(task.metric(decode(task, out), y).float().cpu())
        loss_sum += float(task.loss(out, y)) * (1 if loss_reduction(task) == "sum" else len(x))
        n += len(x)
    err = torch.cat(errors)
    if not torch.isfinite(err).all():
        raise FloatingPointError(f"{desc}: non-finite {task.metric_name} on {int((~torch.isfinite(err)).sum())} samples")
    return {task.metric_name: float(err.mean()), "loss": loss_sum / max(n, 1)}


def decode(task: TaskData, out: torch.Tensor) -> torch.Tensor:
    """Model output -> physical units (identity for tasks without a decoder)."""
    return task.decode(out) if task.decode is not None else out


def loss_reduction(task: TaskData) -> str:
    """``sum`` or ``mean``: how ``task.loss`` reduces over the batch (dense tasks sum, as ORCA/FNO)."""
    return getattr(task.loss, "reduction", "sum" if task.kind == "dense" else "mean")
