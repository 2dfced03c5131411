"""Target embedders: map a new modality onto the token grid the pretrained body expects.

ORCA's 2D embedder resizes the input to the body's resolution and applies a 4x4/stride-4 conv plus
LayerNorm, exactly the shape of Swin's own patch embedding. Initialising it from the pretrained
patch embedding (the RGB kernel slices tiled over the input channels) is ORCA's "source init", and
the ablation that later work found as good as OTDD alignment for 2D tasks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvEmbedder2d(nn.Module):
    """Resize ``[B, C_in, H, W]`` to ``img_size`` and patchify to tokens ``[B, H/p, W/p, D]`` (NHWC, as timm Swin).

    Args:
        in_channels: target input channels ``C_in``.
        embed_dim: token width ``D`` of the body's first stage.
        img_size: resolution the body runs at.
        patch_size: patch (= stride) of the conv.
    """

    def __init__(self, in_channels: int, embed_dim: int, img_size: int = 224, patch_size: int = 4):
        super().__init__()
        self.in_channels, self.img_size, self.patch_size = in_channels, img_size, patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"embedder expects input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    @torch.no_grad()
    def init_from_patch_embed(self, patch_embed: nn.Module) -> None:
        """Copy a pretrained Swin patch embedding, tiling its RGB kernels over ``C_in`` channels."""
        weight = patch_embed.proj.weight  # [D, 3, p, p]
        if weight.shape[0] != self.proj.out_channels or weight.shape[-1] != self.patch_size:
            raise ValueError(f"pretrained patch embedding {list(weight.shape)} does not fit embedder "
                             f"{list(self.proj.weight.shape)}")
        idx = torch.arange(self.in_channels) % weight.shape[1]
        self.proj.weight.copy_(weight[:, idx])
        self.proj.bias.copy_(patch_embed.proj.bias)
        if isinstance(patch_embed.norm, nn.LayerNorm):
            self.norm.load_state_dict(patch_embed.norm.state_dict())
