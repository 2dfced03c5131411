"""``python -m orca export``: a trained run's weights leave the project through peft, a plain state dict
or orca's adapter files, and reproduce the run's outputs."""
from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from orca.adapters import build_method
from orca.adapters.io import load_adapter
from orca.bodies import create_body
from orca.cli import main
from orca.config import load_config
from orca.model import build_model
from orca.train import run_stage3
from tests.conftest import tiny_overrides_under

pytestmark = pytest.mark.usefixtures("one_thread")

RANK_MAP = {r"layers\.0\..*qkv": 2, "layers.1.blocks.0.attn.proj": 0, r"layers\.3\..*fc1": 6}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One epoch of LoRA with a rank map (uneven ranks, one module at rank 0) on the tiny Swin."""
    tmp = tmp_path_factory.mktemp("export")
    rank_map = tmp / "rank_map.json"
    rank_map.write_text(json.dumps({"rank_map": RANK_MAP}))
    cfg = load_config(None, tiny_overrides_under(tmp) + [
        "train.epochs=1", "train.lr=3e-2", "adapter.method=lora", "adapter.rank=4", "adapter.targets=all",
        f"adapter.rank_map={rank_map}", f"run_dir={tmp / 'run'}"])
    return run_stage3(cfg).path, cfg


def trained_model(cfg, run_dir, checkpoint="best"):
    """Our model with the run's checkpoint loaded: the outputs every export must reproduce."""
    saved = torch.load(run_dir / "ckpt" / f"{checkpoint}.pt", weights_only=True)
    model = build_model(cfg.model, SimpleNamespace(**saved["task_shape"]))
    build_method(cfg.adapter).prepare(model)
    model.load_state_dict(saved["model"])
    return model.eval(), saved


def inputs(cfg, run_dir, n):
    shape = torch.load(run_dir / "ckpt" / "best.pt", weights_only=True)["task_shape"]
    return torch.randn(n, shape["in_channels"], cfg.model.img_size, cfg.model.img_size)


def plain_body(cfg):
    body = create_body(cfg.model.body, weights="none", img_size=cfg.model.img_size, **cfg.model.body_kwargs)
    body.patch_embed = nn.Identity()
    return body.eval()


def files_of(path):
    return {os.path.relpath(os.path.join(root, n), path): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(path) for n in names}


def test_peft_export_loads_in_peft_and_reproduces_outputs(lora_run, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    run_dir, cfg = lora_run
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert f"{tmp_path / 'p'}" in capsys.readouterr().out
    model, saved = trained_model(cfg, run_dir)
    peft_cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["rank_pattern"]["layers\\.0\\.blocks\\.0\\.attn\\.qkv"] == 2
    assert "layers.1.blocks.0.attn.proj" not in peft_cfg["target_modules"]  # rank 0: not adapted

    body = plain_body(cfg)  # W0: the run's frozen base weights, under the plain timm names
    body.load_state_dict(base_weights(saved), strict=True)
    loaded = peft.PeftModel.from_pretrained(body, str(tmp_path / "p")).eval()
    parts = load_file(str(tmp_path / "p" / "embedder_head.safetensors"))
    model2, _ = trained_model(cfg, run_dir)  # a second copy whose embedder/head come from the export
    model2.embedder.load_state_dict({k[len("embedder."):]: v for k, v in parts.items() if k.startswith("embedder.")})
    model2.head.load_state_dict({k[len("head."):]: v for k, v in parts.items() if k.startswith("head.")})
    x = inputs(cfg, run_dir, 3)
    with torch.no_grad():
        ours = model(x)
        theirs = model2.head(loaded.base_model.model.forward_features(model2.embedder(x)))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # The adapters matter: without them (peft disabled), the outputs differ.
    with torch.no_grad(), loaded.disable_adapter():
        plain = model2.head(loaded.base_model.model.forward_features(model2.embedder(x)))
    assert (plain - ours).abs().max() > 1e-4
    info = json.loads((tmp_path / "p" / "export.json").read_text())
    assert info["format"] == "peft" and info["checkpoint"].endswith("best.pt") and info["method"] == "lora"


def test_merged_export_loads_into_plain_timm(lora_run, tmp_path):
    run_dir, cfg = lora_run
    assert main(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not [k for k in merged if "lora_" in k or "base_layer" in k]
    model, _ = trained_model(cfg, run_dir)
    body = plain_body(cfg)
    body.load_state_dict({k[len("body."):]: v for k, v in merged.items() if k.startswith("body.")}, strict=True)
    fresh = build_model(cfg.model, SimpleNamespace(**torch.load(run_dir / "ckpt" / "best.pt",
                                                                weights_only=True)["task_shape"])).eval()
    fresh.load_state_dict(merged, strict=True)
    x = inputs(cfg, run_dir, 3)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(fresh(x), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(body.forward_features(model.embedder(x)), model.forward_features(x),
                                   atol=1e-5, rtol=0)


def base_weights(saved):
    """The run's frozen body weights W0 under the plain timm names (``qkv.base_layer.weight`` -> ``qkv.weight``)."""
    return {k[len("body."):].replace(".base_layer.", "."): v for k, v in saved["model"].items()
            if k.startswith("body.") and "lora_" not in k}


def test_adapter_export_of_last_checkpoint_round_trips(lora_run, tmp_path):
    run_dir, cfg = lora_run
    out = tmp_path / "a"
    assert main(["export", str(run_dir), "--format", "adapter", "--checkpoint", "last", "--out", str(out)]) == 0
    model, saved = trained_model(cfg, run_dir, "last")
    fresh = build_model(cfg.model, SimpleNamespace(**saved["task_shape"]))
    with torch.no_grad():  # unlike the trained model everywhere, so the comparison can fail
        for p in fresh.parameters():
            p.normal_()
    fresh.body.load_state_dict(base_weights(saved))  # an adapter holds no W0: it comes from the body's weights
    load_adapter(fresh, out)  # prepares the method, loads adapters, embedder and head
    x = inputs(cfg, run_dir, 2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv,code,message", [
    (["--format", "onnx"], 2, r"^error: unknown export format 'onnx', --format, choose one of peft, merged, adapter$"),
    (["--format", "peft", "--checkpoint", "middle"], 2, r"^error: unknown checkpoint 'middle', --checkpoint"),
])
def test_bad_format_is_one_line(lora_run, capsys, argv, code, message):
    run_dir, _ = lora_run
    before = files_of(run_dir)
    assert main(["export", str(run_dir), *argv]) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err
    assert files_of(run_dir) == before


def test_bad_run_dir_and_run_without_adapters_are_one_line(tmp_path, tiny_overrides, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: not a run directory (no config.yaml), {tmp_path / 'nowhere'}, ")

    run_dir = tmp_path / "full"
    run_stage3(load_config(None, tiny_overrides + ["train.epochs=1", "adapter.method=full", f"run_dir={run_dir}"]))
    capsys.readouterr()
    before = files_of(run_dir)
    assert main(["export", str(run_dir), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter.method=full, which has no adapters" in err and "--format merged" in err
    assert files_of(run_dir) == before
    assert main(["export", str(run_dir), "--format", "merged"]) == 0  # full fine-tuning: the weights themselves
    capsys.readouterr()

    (run_dir / "ckpt" / "best.pt").write_bytes(b"\0" * 10)  # a damaged checkpoint names its path
    assert main(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run_dir / 'ckpt' / 'best.pt'}" in err and "--checkpoint" in err
