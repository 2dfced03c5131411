"""Task heads on the body's final feature map ``[B, h, w, C]`` (NHWC)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Mean-pool the final tokens, then one Linear (ORCA / timm's avg-pool classifier)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.mean(dim=(1, 2)))


class DenseDecoderHead(nn.Module):
    """ORCA's SimMIM-style decoder: 1x1 conv -> PixelShuffle back to input resolution -> pool to the grid.

    A 1x1 conv maps each final token to ``scale^2 * channels`` values, PixelShuffle(scale) unfolds them
    into a ``channels x img_size x img_size`` image, the channel mean gives one field, and adaptive
    average pooling brings it to the target grid (85x85 for Darcy).

    Args:
        in_features: width ``C`` of the final tokens.
        scale: body downsampling factor (32 for Swin: patch 4 x three merges).
        out_shape: target grid ``(H_out, W_out)``.
        channels: decoder channels before the mean (ORCA: 3).
    """

    def __init__(self, in_features: int, scale: int, out_shape: Tuple[int, int], channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_features, scale * scale * channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.pool = nn.AdaptiveAvgPool2d(tuple(out_shape))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(self.conv(feats.permute(0, 3, 1, 2)))
        return self.pool(x.mean(dim=1, keepdim=True)).squeeze(1)
