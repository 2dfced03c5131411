"""ORCA model: shapes, embedder source-init, weight sources and their errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from datasets.registry import TaskData
from orca.bodies import WeightsError, create_body, save_body, set_attention
from orca.config import ModelConfig
from orca.schema import ConfigError
from orca.model import ORCAModel, build_model
from tests.conftest import TINY_BODY

SWIN = "swin_tiny_patch4_window7_224"


def fake_task(kind="dense", in_channels=3, out_shape=(9, 9)):
    ds = TensorDataset(torch.zeros(2, in_channels, 9, 9), torch.zeros(2, *out_shape))
    return TaskData(ds, ds, ds, in_channels, kind, out_shape, loss=lambda p, y: (p - y).pow(2).mean(),
                    metric=lambda p, y: (p - y).flatten(1).norm(dim=1), metric_name="err")


def tiny_cfg(**kw):
    return ModelConfig(body=SWIN, weights="none", img_size=32, body_kwargs=dict(TINY_BODY), **kw)


@pytest.mark.parametrize("kind, out_shape, expect", [("dense", (9, 9), (2, 9, 9)),
                                                     ("classification", (5,), (2, 5))])
def test_forward_shapes(kind, out_shape, expect):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), fake_task(kind, out_shape=out_shape))
    out = model(torch.randn(2, 3, 9, 9))
    assert out.shape == expect and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"No gradient for {missing}"


def test_embedder_source_init_tiles_rgb_kernels():
    torch.manual_seed(0)
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    reference = body.patch_embed.proj.weight.detach().clone()
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), fake_task(in_channels=5))
    w = model.embedder.proj.weight
    assert w.shape[1] == 5
    for c in range(5):
        torch.testing.assert_close(w[:, c], reference[:, c % 3])
    assert isinstance(model.body.patch_embed, torch.nn.Identity)


def test_wrong_input_shape_is_a_clear_error():
    model = build_model(tiny_cfg(), fake_task())
    with pytest.raises(ValueError, match=r"embedder expects input \[B, 3, H, W\], got \[2, 4, 9, 9\]"):
        model(torch.randn(2, 4, 9, 9))


def test_local_file_round_trip_and_variant_mismatch(tmp_path):
    torch.manual_seed(1)
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    path = tmp_path / "body.safetensors"
    save_body(body, SWIN, dict(TINY_BODY), str(path))
    loaded = create_body(SWIN, weights="file", weights_file=str(path), img_size=32, **TINY_BODY)
    for (n, a), (_, b) in zip(body.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    other = dict(TINY_BODY, embed_dim=32, num_heads=[1, 2, 2, 4])
    with pytest.raises(WeightsError, match="was saved for a Swin with"):
        create_body(SWIN, weights="file", weights_file=str(path), img_size=32, **other)
    with pytest.raises(WeightsError, match="holds weights of swin_tiny"):
        create_body("swin_small_patch4_window7_224", weights="file", weights_file=str(path), img_size=32, **TINY_BODY)
    # A plain state dict without our header: shape mismatch is still caught by timm's loader.
    torch.save(body.state_dict(), tmp_path / "plain.pth")
    with pytest.raises((WeightsError, RuntimeError), match="size mismatch|does not fit"):
        create_body(SWIN, weights="file", weights_file=str(tmp_path / "plain.pth"), img_size=32, **other)


def test_file_loads_at_any_stochastic_depth(tmp_path):
    """drop_path_rate changes training noise, not shapes: a file saved at timm's default loads at 0
    (and the blocks then drop nothing), while a real variant change is still refused."""
    torch.manual_seed(3)
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    path = tmp_path / "body.safetensors"
    save_body(body, SWIN, dict(TINY_BODY), str(path))
    loaded = create_body(SWIN, weights="file", weights_file=str(path), img_size=32, drop_path_rate=0.0, **TINY_BODY)
    for (n, a), (_, b) in zip(body.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    drops = [m for m in loaded.modules() if type(m).__name__ == "DropPath"]
    assert not drops and any(type(m).__name__ == "DropPath" for m in body.modules())
    loaded.train()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), loaded(x))  # no stochastic depth left to make two passes differ
    with pytest.raises(WeightsError, match="was saved for a Swin with"):
        create_body(SWIN, weights="file", weights_file=str(path), img_size=32, drop_path_rate=0.0,
                    **dict(TINY_BODY, embed_dim=32, num_heads=[1, 2, 2, 4]))


def test_own_files_bypass_timms_layout_guess(tmp_path, monkeypatch):
    """timm < 1.0.31 shifted layers.N.downsample of headless timm-layout files to N + 1 (a GPU run
    failed so); our files must load whatever that filter does, and original-layout ones still go to it."""
    import timm.models.swin_transformer as swin

    def old_timm_filter(state, model):  # the pre-1.0.31 behaviour on a headless file
        import re
        calls.append(sorted(state))
        return {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k): v
                for k, v in state.items()}

    calls = []
    monkeypatch.setattr(swin, "checkpoint_filter_fn", old_timm_filter)
    torch.manual_seed(2)
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    path = tmp_path / "body.safetensors"
    save_body(body, SWIN, dict(TINY_BODY), str(path))
    loaded = create_body(SWIN, weights="file", weights_file=str(path), img_size=32, **TINY_BODY)
    assert calls == []
    for (n, a), (_, b) in zip(body.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    original = {k: v for k, v in body.state_dict().items()}
    original["layers.0.downsample.reduction.weight"] = original.pop("layers.1.downsample.reduction.weight")
    torch.save(original, tmp_path / "original.pth")
    with pytest.raises((WeightsError, RuntimeError)):  # shapes no longer fit; what matters is the route
        create_body(SWIN, weights="file", weights_file=str(tmp_path / "original.pth"), img_size=32, **TINY_BODY)
    assert len(calls) == 1


def test_missing_weights_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="body weights file not found"):
        create_body(SWIN, weights="file", weights_file=str(tmp_path / "none.safetensors"), img_size=32, **TINY_BODY)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of waiting for a network timeout
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="could not load hub weights .*Offline\\?"):
        create_body(SWIN, weights="hub", hub_tag="ms_in1k", img_size=32, **TINY_BODY)


def test_not_a_swin_is_refused():
    with pytest.raises(ValueError, match="is not a timm Swin model"):
        create_body("resnet18")


def test_orca_model_arch_lists_every_tensor():
    model = build_model(tiny_cfg(), fake_task())
    assert isinstance(model, ORCAModel)
    assert set(model.arch()) == set(model.state_dict())


def test_sdpa_attention_is_the_same_function_as_bmm():
    """model.attention=sdpa changes kernels, not the function: outputs and every gradient agree with
    timm's explicit matmuls, shifted windows (the -100 mask) included."""
    cfg = dict(TINY_BODY, depths=(2, 2, 2, 2))  # the second block of a stage is the shifted one
    bodies = {}
    for kind in ("bmm", "sdpa"):
        torch.manual_seed(3)
        bodies[kind] = create_body(SWIN, img_size=32, **cfg)
        assert set_attention(bodies[kind], kind) == kind
        switched = [m.fused_attn for m in bodies[kind].modules() if hasattr(m, "fused_attn")]
        assert switched == [kind == "sdpa"] * sum(cfg["depths"])
    assert any(blk.shift_size for blk in bodies["sdpa"].modules() if hasattr(blk, "shift_size")
               and isinstance(blk.shift_size, tuple) and any(blk.shift_size)), "no shifted window was tested"
    x = torch.randn(3, 3, 32, 32)
    outs = {}
    for kind, body in bodies.items():
        torch.manual_seed(7)  # the same stochastic-depth draws (timm's Swin default drop_path_rate is 0.1)
        out = body(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs[kind] = out
    torch.testing.assert_close(outs["sdpa"], outs["bmm"], rtol=1e-5, atol=1e-5)
    grads = {kind: dict(body.named_parameters()) for kind, body in bodies.items()}
    for name, p in grads["bmm"].items():
        torch.testing.assert_close(grads["sdpa"][name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sdpa_attention_keeps_off_cudnn_and_survives_copies(monkeypatch):
    """With sdpa, every window-attention call runs with cuDNN's attention kernel switched off (it was 2x
    slower than the memory-efficient one for LoRA's frozen bias on an H200) and the memory-efficient one
    on; outside the body the global choice is untouched; copies call their own modules; bmm undoes it."""
    import copy

    import timm.models.swin_transformer as swin

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)  # timm calls it by this path
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    set_attention(body, "sdpa")
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    body(torch.randn(2, 3, 32, 32))
    assert seen and set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before
    twin = copy.deepcopy(body)
    attn = [m for m in twin.modules() if isinstance(m, swin.WindowAttention)]
    assert all(m.forward.__self__ is m for m in attn), "a deep copy must call its own attention modules"
    torch.testing.assert_close(twin(torch.ones(1, 3, 32, 32)), body(torch.ones(1, 3, 32, 32)))
    set_attention(twin, "bmm")
    seen.clear()
    twin(torch.randn(1, 3, 32, 32))
    assert not seen and all("forward" not in vars(m) for m in attn)


def test_attention_choice_errors_and_auto():
    body = create_body(SWIN, img_size=32, **TINY_BODY)
    with pytest.raises(ValueError, match=r"attention='flash': choose one of auto, sdpa, bmm"):
        set_attention(body, "flash")
    assert set_attention(body, "auto") == "sdpa"  # the default on timm's Swin (V1)
    # Swin V2 has no switch: auto and bmm keep its own attention, sdpa is refused with the way out
    v2 = create_body("swinv2_tiny_window8_256", img_size=32, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                     window_size=4)
    assert set_attention(v2, "auto") == set_attention(v2, "bmm") == "bmm"
    with pytest.raises(ValueError, match=r"SwinTransformerV2 has no timm Swin \(V1\) WindowAttention to switch; "
                                         r"use attention=auto or bmm"):
        set_attention(v2, "sdpa")
    with pytest.raises(ValueError, match=r"Linear has no timm Swin \(V1\) WindowAttention"):
        set_attention(torch.nn.Linear(2, 2), "sdpa")
    with pytest.raises(ConfigError, match=r"model.attention='flash' is not allowed"):
        ModelConfig(attention="flash")
    model = build_model(tiny_cfg(attention="sdpa"), fake_task())
    assert all(m.fused_attn for m in model.body.modules() if hasattr(m, "fused_attn"))
