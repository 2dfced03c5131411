"""Stage 0's SimMIM objective: the mask hides exactly what it says, the loss reads only masked pixels,
a tiny run lowers the reconstruction error and saves a plain body, bad settings fail clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orca.bodies import create_body
from orca.cli import main as cli_main
from orca.config import load_config
from orca.masked_pretraining import MaskedImageModel, mask_grid, masked_l1, random_block_mask
from orca.schema import ConfigError
from tests.conftest import TINY_BODY
from tests.test_pretrain import BODY, stage0_overrides


def _model(img: int = 32, mask_patch: int = 8) -> MaskedImageModel:
    torch.manual_seed(0)
    body = create_body(BODY, weights="none", img_size=img, **TINY_BODY)
    body.reset_classifier(5)
    return MaskedImageModel(body, img, mask_patch).eval()


def test_block_mask_has_the_stated_count_and_follows_its_generator():
    mask = random_block_mask(64, 7, 0.6, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert mask.shape == (64, 7, 7) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == round(0.6 * 49)).all()  # 29 of 49 in every image
    again = random_block_mask(64, 7, 0.6, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    freq = mask.float().mean(0)  # every block is masked about as often (0.6 +- a few sigma of 64 draws)
    assert freq.min() > 0.3 and freq.max() < 0.9
    # the extremes keep one block visible and one masked
    assert (random_block_mask(3, 4, 0.999, torch.device("cpu")).flatten(1).sum(1) == 15).all()
    assert (random_block_mask(3, 4, 1e-3, torch.device("cpu")).flatten(1).sum(1) == 1).all()


def test_masked_pixels_cannot_reach_the_outputs():
    """Swin's patch embedding does not overlap patches, so after the mask token replaces a block's tokens
    nothing of the block's pixels is left: changing them changes neither logits nor reconstruction,
    while changing one visible pixel does."""
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1, 2] = mask[:, 3, 0] = True
    with torch.no_grad():
        logits, rec = model(x, mask)
        pix = model.pixel_mask(mask)
        assert pix.shape == (2, 1, 32, 32) and pix.sum() == 2 * 2 * 64
        x_masked_changed = x + 5.0 * torch.randn_like(x) * pix
        logits2, rec2 = model(x_masked_changed, mask)
        x_visible_changed = x.clone()
        x_visible_changed[:, :, 0, 0] += 5.0
        logits3, _ = model(x_visible_changed, mask)
    assert rec.shape == x.shape and logits.shape == (2, 5)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(rec2, rec, rtol=0, atol=1e-6)
    assert (logits3 - logits).abs().max() > 1e-4


def test_masked_l1_averages_over_masked_pixels_only():
    target = torch.randn(2, 3, 8, 8)
    pix = torch.zeros(2, 1, 8, 8)
    pix[0, :, :4, :4] = 1.0
    rec = target.clone()
    rec[:, :, 4:, :] += 100.0  # wrong only where unmasked: no loss
    assert masked_l1(rec, target, pix) == 0.0
    rec = target.clone()
    rec[0, :, :4, :4] += 2.0  # wrong by 2 on every masked pixel and channel
    rec[1] -= 7.0  # image 1 has no masked pixel
    torch.testing.assert_close(masked_l1(rec, target, pix), torch.tensor(2.0))


def test_tiny_run_learns_to_reconstruct_and_saves_a_plain_body(tmp_path):
    out = tmp_path / "runs"
    assert cli_main(["stage0", *stage0_overrides(out), "pretrain.mim_weight=1.0", "pretrain.mim_mask_patch=8"]) == 0
    (run,) = out.iterdir()
    s = json.loads((run / "summary.json").read_text())
    assert s["optim"]["mim"] == {"weight": 1.0, "mask_ratio": 0.6, "mask_patch": 8}
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    mim = [r["train/mim"] for r in train]
    assert all(abs(r["train/loss"] - r["train/ce"] - r["train/mim"]) < 1e-4 for r in train)
    assert sum(mim[-5:]) / 5 < 0.9 * sum(mim[:5]) / 5, mim  # the reconstruction error falls
    assert s["val"]["top1"] > s["val"]["chance"]  # classification still trains on masked inputs
    saved = load_file(str(run / "body.safetensors"))
    assert not any("mask_token" in k or "decoder" in k or k.startswith("head.") for k in saved)
    body = create_body(BODY, weights="file", weights_file=str(run / "body.safetensors"), img_size=32, **TINY_BODY)
    assert saved.keys() <= body.state_dict().keys()


def test_bad_mask_settings_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match=r"1.0 is out of range, pretrain.mim_mask_ratio, give a value > 0 and < 1"):
        load_config(None, ["pretrain.mim_mask_ratio=1.0"])
    with pytest.raises(ConfigError, match=r"-1.0 is out of range, pretrain.mim_weight, give a value >= 0"):
        load_config(None, ["pretrain.mim_weight=-1.0"])
    with pytest.raises(ConfigError, match="pretrain.mim_mask_patch=6 must be a multiple of the body's patch size 4"):
        mask_grid(224, 4, 6)
    with pytest.raises(ConfigError, match="divides model.img_size=32"):
        _model(img=32, mask_patch=24)
    assert mask_grid(224, 4, 32) == 7
