"""scripts/block_change.py: the per-block change of the residual stream is measured, not assumed."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from tests.conftest import Stand, load_script


def tiny_model():
    torch.manual_seed(0)
    body = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(2, 1, 1, 1),
                             num_heads=(1, 1, 2, 2), img_size=32, window_size=2, num_classes=0)
    return Stand(nn.Identity(), body, nn.Identity()).eval()


def test_an_identity_block_moves_nothing_and_a_scaled_branch_moves_by_its_norm():
    bc = load_script("block_change.py")
    model = tiny_model()
    x = torch.randn(3, 3, 32, 32)
    first = model.body.layers[0].blocks[0]
    with torch.no_grad():  # both residual branches end in a zero Linear: the block is the identity
        for lin in (first.attn.proj, first.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    changes = bc.block_changes(model, x)
    assert list(changes) == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.2.blocks.0",
                             "layers.3.blocks.0"]
    assert changes["layers.0.blocks.0"] == 0.0
    assert all(v > 0 for k, v in changes.items() if k != "layers.0.blocks.0")
    # against a hand computation on the second block: its input is the first block's output
    inputs = {}
    handle = model.body.layers[0].blocks[1].register_forward_hook(lambda m, i, o: inputs.update(x=i[0], y=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    want = ((inputs["y"] - inputs["x"]).flatten(1).norm(dim=1) / inputs["x"].flatten(1).norm(dim=1)).mean().item()
    assert changes["layers.0.blocks.1"] == pytest.approx(want, rel=1e-6)


def test_a_body_without_swin_blocks_is_refused_by_name():
    bc = load_script("block_change.py")
    with pytest.raises(ValueError, match="no SwinTransformerBlock in body Sequential"):
        bc.block_changes(Stand(nn.Identity(), nn.Sequential(nn.Linear(4, 4)), nn.Identity()), torch.randn(2, 4))


def test_the_command_writes_both_bodies_on_every_block(tmp_path):
    import json

    md = load_script("block_change.py").main(["--task", "digits", "--n", "4", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "block_change.json").read_text())
    assert set(out["block_change"]) == {"file", "none"} and out["n"] == 4 and out["task"] == "digits"
    # the fractal body: Swin-T's depths 2, 2, 6, 2
    assert all(len(v) == 12 and all(c > 0 for c in v.values()) for v in out["block_change"].values())
    assert out["block_change"]["file"] != out["block_change"]["none"]
    assert out["git"]["commit"] and "--task digits" in out["command"]
    assert "| layers.2.blocks.5 |" in md.read_text()
