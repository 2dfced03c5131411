"""Per-layer feature capture (rank_estimation.features) on a tiny timm Swin: names, shapes, pooling, errors."""
from __future__ import annotations

import pytest
import torch

from orca.bodies import create_body
from orca.embedders import ConvEmbedder2d
from orca.model import ORCAModel
from rank_estimation.features import EMBED, block_names, capture_block_features, layer_names, resolve_layers

TINY = {"embed_dim": 16, "depths": [1, 2, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}
BLOCKS = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1", "layers.2.blocks.0", "layers.3.blocks.0"]
WIDTH = {"layers.0": 16, "layers.1": 32, "layers.2": 64, "layers.3": 128}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    body = create_body("swin_tiny_patch4_window7_224", weights="none", img_size=32, **TINY)
    embedder = ConvEmbedder2d(2, 16, img_size=32, patch_size=4)
    embedder.init_from_patch_embed(body.patch_embed)
    body.patch_embed = torch.nn.Identity()
    return ORCAModel(embedder, body, torch.nn.Identity()).eval()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(10, 2, 20, 20, generator=torch.Generator().manual_seed(1))


def _manual_blocks(model, x):
    """Block outputs by running the stages by hand (the reference the hooks must reproduce)."""
    out, h = {}, model.embedder(x)
    out[EMBED] = h
    for i, stage in enumerate(model.body.layers):
        h = stage.downsample(h)
        for j, block in enumerate(stage.blocks):
            h = block(h)
            out[f"layers.{i}.blocks.{j}"] = h
    return out


def test_names_and_shapes(model, inputs):
    assert block_names(model.body) == BLOCKS
    assert layer_names(model.body) == [EMBED, *BLOCKS]
    feats = capture_block_features(model, inputs, batch_size=4)
    assert list(feats) == [EMBED, *BLOCKS]
    assert feats[EMBED].shape == (10, 16)
    for name in BLOCKS:
        assert feats[name].shape == (10, WIDTH[name.rsplit(".", 2)[0]])
        assert feats[name].dtype == torch.float32 and feats[name].device.type == "cpu"


def test_mean_pool_matches_manual_forward(model, inputs):
    feats = capture_block_features(model, inputs, batch_size=3)
    with torch.no_grad():
        ref = _manual_blocks(model, inputs)
    for name, tokens in ref.items():
        torch.testing.assert_close(feats[name], tokens.flatten(1, 2).mean(1), atol=1e-5, rtol=1e-5)


def test_token_pool_all_and_subsampled(model, inputs):
    full = capture_block_features(model, inputs, pool="tokens", tokens_per_sample=0)
    mean = capture_block_features(model, inputs)
    with torch.no_grad():
        ref = _manual_blocks(model, inputs)
    for name in [EMBED, *BLOCKS]:
        t = ref[name].shape[1] * ref[name].shape[2]
        assert full[name].shape == (10 * t, mean[name].shape[1])
        # token rows grouped by image: their per-image mean is the mean-pooled feature
        torch.testing.assert_close(full[name].view(10, t, -1).mean(1), mean[name], atol=1e-5, rtol=1e-5)
    sub = capture_block_features(model, inputs, pool="tokens", tokens_per_sample=3, seed=4)
    again = capture_block_features(model, inputs, pool="tokens", tokens_per_sample=3, seed=4)
    for name in [EMBED, *BLOCKS]:
        t = ref[name].shape[1] * ref[name].shape[2]
        assert sub[name].shape[0] == 10 * min(3, t)
        torch.testing.assert_close(sub[name], again[name])  # seeded
        rows = full[name].view(10, t, -1)
        for i in range(10):  # every kept row is one of that image's tokens
            kept = sub[name].view(10, min(3, t), -1)[i]
            dist = torch.cdist(kept, rows[i], compute_mode="donot_use_mm_for_euclid_dist")
            assert dist.min(1).values.max() < 1e-5


def test_layer_subset_dataset_and_loader_inputs(model, inputs):
    full = capture_block_features(model, inputs)
    part = capture_block_features(model, inputs, layers=["layers.1.blocks.1", EMBED])
    assert list(part) == [EMBED, "layers.1.blocks.1"]  # forward order, stops after the deepest
    torch.testing.assert_close(part["layers.1.blocks.1"], full["layers.1.blocks.1"])
    ds = torch.utils.data.TensorDataset(inputs, torch.zeros(10))
    from_ds = capture_block_features(model, ds, batch_size=4)
    from_loader = capture_block_features(model, torch.utils.data.DataLoader(ds, batch_size=6))
    for name in full:
        torch.testing.assert_close(from_ds[name], full[name])
        torch.testing.assert_close(from_loader[name], full[name])


def test_other_embedder_and_bare_body(model, inputs):
    rgb = ConvEmbedder2d(3, 16, img_size=32, patch_size=4)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats = capture_block_features(model, images, embedder=rgb)
    with torch.no_grad():
        torch.testing.assert_close(feats[EMBED], rgb(images).flatten(1, 2).mean(1), atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    body = create_body("swin_tiny_patch4_window7_224", weights="none", img_size=32, **TINY).eval()
    bare = capture_block_features(body, images, layers=[EMBED, "layers.3.blocks.0"])
    with torch.no_grad():
        torch.testing.assert_close(bare[EMBED], body.patch_embed(images).flatten(1, 2).mean(1))
    assert bare["layers.3.blocks.0"].shape == (6, 128)


def test_modes_restored_and_no_grad(model, inputs):
    model.train()
    try:
        feats = capture_block_features(model, inputs, layers=["layers.0.blocks.0"])
        assert model.training and model.body.training and model.embedder.training
        assert not feats["layers.0.blocks.0"].requires_grad
        assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ["layers.0.blocks.3"]}, "layer 'layers.0.blocks.3' does not exist in this body; did you mean"),
    ({"layers": ["blocks.0"]}, "(layers: embed, layers.0.blocks.0, layers.1.blocks.0"),
    ({"layers": []}, "layers is empty"),
    ({"pool": "max"}, "pool='max' is not allowed; choose one of ('mean', 'tokens')"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"tokens_per_sample": -1}, "tokens_per_sample=-1"),
    ({"amp": "fp16"}, "amp='fp16' is not allowed"),
])
def test_bad_arguments(model, inputs, kwargs, message):
    with pytest.raises(ValueError) as err:
        capture_block_features(model, inputs, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("empty", [
    torch.empty(0, 2, 20, 20),
    torch.utils.data.TensorDataset(torch.empty(0, 2, 20, 20)),
    [],
], ids=["tensor", "dataset", "iterable"])
def test_empty_inputs(model, empty):
    with pytest.raises(ValueError, match="empty"):
        capture_block_features(model, empty)


def test_non_swin_body_and_nonfinite_inputs(model, inputs):
    with pytest.raises(ValueError, match="no body.layers\\[i\\].blocks\\[j\\] layout"):
        resolve_layers(torch.nn.Linear(2, 2))
    bad = inputs.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer 'embed' hold NaN/inf in 1 of 10 rows"):
        capture_block_features(model, bad)
