"""What a field-to-field regression task shares: FNO's per-pixel unit-Gaussian normaliser and the
relative L2 error it is trained and scored with (neuraloperator's ``UnitGaussianNormalizer`` and
``LpLoss``).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn


class UnitGaussianNormalizer(nn.Module):
    """FNO's per-pixel unit-Gaussian normalizer, with mean/std as buffers so checkpoints carry them.

    Args:
        shape: shape of one sample (``(s, s)``); buffers start as mean 0, std 1.
        eps: added to std, so constant pixels (std 0) do not divide by zero (FNO: 1e-5).
    """

    def __init__(self, shape: Tuple[int, ...] = (), eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: Union[torch.Tensor, np.ndarray]) -> "UnitGaussianNormalizer":
        """Per-pixel mean and unbiased std over the sample axis (dim 0), as FNO computes them.

        Args:
            x: ``[N, ...]`` with N >= 2.
        """
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim < 1 or x.shape[0] < 2:
            raise ValueError(f"UnitGaussianNormalizer.fit needs >= 2 samples along dim 0, got shape {tuple(x.shape)}")
        self.mean = x.mean(0)
        self.std = x.std(0)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + eps)``; x ``[..., *shape]``."""
        return (x - self.mean.to(x)) / (self.std.to(x) + self.eps)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`; x ``[..., *shape]``."""
        return x * (self.std.to(x) + self.eps) + self.mean.to(x)

    transform, inverse_transform = encode, decode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def inverse(self) -> "NormalizerDecode":
        """A Module whose forward decodes, sharing this normalizer's buffers (for ``TaskData.decode``)."""
        return NormalizerDecode(self)


class NormalizerDecode(nn.Module):
    """``forward = normalizer.decode``: model output (normalised) -> physical units."""

    def __init__(self, normalizer: UnitGaussianNormalizer):
        super().__init__()
        self.normalizer = normalizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.decode(x)


class RelativeL2:
    """Relative L2 error ``||pred - y|| / ||y||`` per sample (FNO's LpLoss.rel with p = 2).

    Args:
        reduction: ``"mean"``, ``"sum"`` (ORCA/FNO training loss) or ``"none"`` (per-sample ``[B]``).
        decode: applied to ``pred`` first, so a model trained on normalised u is scored in physical units.
    """

    REDUCTIONS = ("sum", "mean", "none")

    def __init__(self, reduction: str = "mean", decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"RelativeL2 reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.decode = decode

    @property
    def name(self) -> str:
        return "rel_l2"

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: pred ``[B, ...]``, target ``[B, ...]`` with equal numbers of elements per sample."""
        if self.decode is not None:
            pred = self.decode(pred)
        b = target.shape[0]
        if pred.shape[0] != b or pred.numel() != target.numel():
            raise ValueError(f"RelativeL2: pred {tuple(pred.shape)} and target {tuple(target.shape)} do not match")
        pred, target = pred.float().reshape(b, -1), target.float().reshape(b, -1)
        err = torch.linalg.vector_norm(pred - target, dim=1) / torch.linalg.vector_norm(target, dim=1)
        if self.reduction == "sum":
            return err.sum()
        return err.mean() if self.reduction == "mean" else err

    def __repr__(self) -> str:
        return f"RelativeL2(reduction={self.reduction!r}, decode={self.decode is not None})"
