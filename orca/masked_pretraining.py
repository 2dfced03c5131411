"""Stage 0's optional second objective: SimMIM masked-image reconstruction beside the fractal classes.

Why: a classifier's last stage only has to keep what separates the classes, but ORCA's dense tasks
(Darcy) read the body's *last* feature map through a SimMIM decoder (``orca.heads.DenseDecoderHead``:
a 1x1 conv to ``scale^2 * 3`` values per token, PixelShuffle back to the image). Under LoRA the body
can barely change, so a dense task needs the final tokens to still describe their 32 x 32 pixel
patch. SimMIM (Xie et al., CVPR 2022, "SimMIM: a Simple Framework for Masked Image Modeling") trains
exactly that readout: random 32 px blocks of the input are replaced by a learnt mask token after the
patch embedding, and a 1x1 conv + PixelShuffle decoder on the last stage must regress the masked
pixels (L1). MIM-pretrained bodies are known to transfer better than supervised ones to geometric,
weakly semantic tasks (Xie et al., "Revealing the Dark Secrets of Masked Image Modeling", CVPR 2023).
The cross entropy stays, computed on the same masked forward (one pass, so the step costs what the
classifier's step costs), so the body keeps the class features the natural-image tasks use.

The mask token and the decoder live here, outside the body: ``save_body`` writes the body alone,
and stages 1-3 never see them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from orca.schema import ConfigError


def mask_grid(img_size: int, patch_size: int, mask_patch: int) -> int:
    """Side of the mask grid, after checking that ``mask_patch`` tiles both the image and the tokens."""
    if mask_patch < patch_size or mask_patch % patch_size or img_size % mask_patch:
        raise ConfigError(f"pretrain.mim_mask_patch={mask_patch} must be a multiple of the body's patch size "
                          f"{patch_size} that divides model.img_size={img_size} (SimMIM on Swin: 32)")
    return img_size // mask_patch


def random_block_mask(batch: int, grid: int, ratio: float, device: torch.device,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[batch, grid, grid]`` bool, True where masked: exactly ``round(ratio * grid^2)`` blocks per image
    (at least one, at most all but one), chosen uniformly."""
    cells = grid * grid
    k = min(cells - 1, max(1, round(ratio * cells))) if cells > 1 else 1
    scores = torch.rand(batch, cells, device=device, generator=generator)
    masked = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, cells, dtype=torch.bool, device=device)
    mask.scatter_(1, masked, True)
    return mask.view(batch, grid, grid)


class MaskedImageModel(nn.Module):
    """A timm Swin body with SimMIM's mask token and decoder: ``(logits, reconstruction) = m(x, mask)``.

    Args:
        body: timm ``SwinTransformer`` with its classifier (``reset_classifier``) in place.
        img_size: input side in pixels.
        mask_patch: side of a masked block in pixels.
    """

    def __init__(self, body: nn.Module, img_size: int, mask_patch: int = 32):
        super().__init__()
        self.body = body
        patch = body.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.grid = mask_grid(img_size, patch, mask_patch)
        self.tokens_per_block = mask_patch // patch
        self.in_chans = body.patch_embed.proj.in_channels
        embed_dim = body.patch_embed.proj.out_channels
        self.stride = int(body.feature_info[-1]["reduction"])  # pixels per final token (32 for Swin)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(body.num_features, self.stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.body.patch_embed(x)  # [B, H/4, W/4, C] (NHWC)
        token_mask = mask.repeat_interleave(self.tokens_per_block, 1).repeat_interleave(self.tokens_per_block, 2)
        tokens = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        feats = self.body.norm(self.body.layers(tokens))  # [B, h, w, C_final]
        logits = self.body.forward_head(feats)
        reconstruction = self.decoder(feats.permute(0, 3, 1, 2))  # [B, in_chans, H, W]
        return logits, reconstruction

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The block mask at pixel resolution, ``[B, 1, H, W]`` float."""
        size = self.tokens_per_block * self.body.patch_embed.patch_size[0]
        return mask.repeat_interleave(size, 1).repeat_interleave(size, 2).unsqueeze(1).float()


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: mean absolute error over the masked pixels only (all channels)."""
    err = F.l1_loss(reconstruction.float(), target.float(), reduction="none") * pixel_mask
    return err.sum() / (pixel_mask.sum() * target.shape[1]).clamp_min(1.0)
