"""Input checks shared by the alignment objectives and the gap metrics: features and labels.

Why one module: OTDD, MMD and stage 2's metrics take the same ``[n, d]`` features and ``[n]``
integer labels from user code, and a bad input should fail with the same message (naming the
argument) wherever it enters.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def check_features(name: str, x, dim: Optional[int] = None, dim_name: Optional[str] = None) -> Tensor:
    """Return ``x`` as a float32/float64 tensor after checking shape and finiteness.

    Args:
        name: argument name used in error messages.
        x: features ``[n, d]`` (tensor or array).
        dim: expected ``d``, if known.
        dim_name: the argument ``dim`` came from, for the mismatch message.
    """
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a [n, d] tensor or array, got {type(x).__name__}") from err
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one [d>0]-dim sample")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # log-domain Sinkhorn at eps = 0.1 and kernel sums need at least float32
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/inf entries")
    if dim is not None and x.shape[1] != dim:
        other = f" of {dim_name}" if dim_name else ""
        raise ValueError(f"{name} has feature dimension {x.shape[1]} but the dimension{other} is {dim}")
    return x


def check_labels(name: str, labels, n: int, feats_name: str, device=None) -> Tensor:
    """Return ``labels`` as a ``long`` tensor of length ``n`` on ``device``.

    Args:
        name: argument name used in error messages.
        labels: class labels ``[n]`` (integers, or floats with integral values).
        n: number of feature rows they label.
        feats_name: the features' argument name, for the length-mismatch message.
        device: where the returned tensor lives.
    """
    if labels is None:
        raise ValueError(f"{name} is required (one label per row of {feats_name})")
    if not torch.is_tensor(labels):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} labels but {feats_name} has {n} rows")
    if labels.is_floating_point():
        if not torch.isfinite(labels).all() or (labels != labels.round()).any():
            raise ValueError(f"{name} must hold integer class labels (got non-integral floats)")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    return labels.long().to(device)


def encode_labels(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Map arbitrary integer labels to 0..C-1: ``(classes [C] in sorted order, index [n])``."""
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    return classes, index


__all__ = ["check_features", "check_labels", "encode_labels"]
