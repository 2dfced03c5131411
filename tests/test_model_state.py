"""Checkpoints without the frozen body (``orca/model_state.py``): a run on a body file saves what it
trains plus a digest of the body, resumes bit-exactly, exports, refuses a replaced body file, and
whole checkpoints (random bodies, Delta-LoRA, older runs) load as before."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from orca.adapters import build_method
from orca.bodies import create_body, save_body
from orca.cli import main
from orca.config import load_config
from orca.model import build_model
from orca.model_state import FROZEN_KEY, load_model_state
from orca.runs import CheckpointMismatch, RunDir
from orca.train import run_stage3
from tests.conftest import tiny_overrides_under

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = "swin_tiny_patch4_window7_224"
BODY_KWARGS = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}


class Killed(Exception):
    pass


def write_body(path, seed):
    torch.manual_seed(seed)
    save_body(create_body(BODY, weights="none", img_size=32, **BODY_KWARGS), BODY, BODY_KWARGS, str(path))


def file_overrides(tmp_path, *extra):
    body = tmp_path / "body.safetensors"
    if not body.exists():
        write_body(body, 0)
    return tiny_overrides_under(tmp_path) + ["model.weights=file", f"model.weights_file={body}", "adapter.method=lora",
                                             "adapter.rank=2", "adapter.targets=all", *extra]


def built(cfg, saved):
    model = build_model(cfg.model, SimpleNamespace(**saved["task_shape"]))
    build_method(cfg.adapter).prepare(model)
    return model.eval()


def test_checkpoint_holds_what_trains_and_resumes_exactly(tmp_path):
    base = file_overrides(tmp_path, "train.batch_size=4", "train.save_every_steps=2")
    full = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'full'}"]))
    last = torch.load(full.path / "ckpt" / "last.pt", weights_only=True)
    best = torch.load(full.path / "ckpt" / "best.pt", weights_only=True)
    model = built(load_config(str(full.path / "config.yaml")), last)
    frozen = [f"body.{n}" for n, p in model.body.named_parameters() if not p.requires_grad]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for saved in (last, best):
        assert sorted(saved[FROZEN_KEY]["names"]) == sorted(frozen) and len(frozen) > 20
        assert not set(frozen) & set(saved["model"]) and set(trained) <= set(saved["model"])
        assert set(saved["model"]) | set(frozen) == set(model.state_dict())  # nothing else is left out
        assert set(saved["arch"]) == set(model.state_dict())  # arch still names every tensor
        assert len(saved[FROZEN_KEY]["sha256"]) == 64

    cfg = load_config(None, base + [f"run_dir={tmp_path / 'killed'}"])

    def kill(step):
        if step == 8:  # epoch 2 of 2, right after the step-8 checkpoint
            raise Killed

    with pytest.raises(Killed):
        run_stage3(cfg, on_step=kill)
    resumed = run_stage3(load_config(str(tmp_path / "killed" / "config.yaml")))
    a, b = (json.loads((r.path / "summary.json").read_text()) for r in (full, resumed))
    assert a["test"] == b["test"] and a["steps"] == b["steps"] == 12
    last_res = RunDir(resumed.path).load_checkpoint("last")["model"]
    assert last["model"].keys() == last_res.keys()
    for k, v in last["model"].items():
        torch.testing.assert_close(last_res[k], v, rtol=0, atol=0, msg=k)

    # the model built from config.yaml plus the checkpoint is the trained model: same as the merged export
    load_model_state(model, best, "best.pt")
    out = tmp_path / "merged"
    assert main(["export", str(full.path), "--format", "merged", "--out", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    for name, layer in model.body.named_modules():
        if hasattr(layer, "lora_A"):
            w = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
            torch.testing.assert_close(merged[f"body.{name}.weight"], w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["head.conv.weight"], model.head.conv.weight.detach())


def test_replaced_body_file_is_refused(tmp_path, capsys):
    cfg = load_config(None, file_overrides(tmp_path, "train.epochs=1", f"run_dir={tmp_path / 'run'}"))
    run = run_stage3(cfg)
    saved = torch.load(run.path / "ckpt" / "best.pt", weights_only=True)
    write_body(tmp_path / "body.safetensors", 1)  # another body under the same file name
    model = built(cfg, saved)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match="frozen body whose weights differ .* model.weights_file replaced"):
        load_model_state(model, saved, "best.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    capsys.readouterr()
    assert main(["export", str(run.path), "--format", "adapter", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "weights differ" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra", [["model.weights=none"], ["adapter.method=delta_lora", "adapter.delta_lora_start=0"]],
                         ids=["random_body", "delta_lora"])
def test_bodies_the_config_cannot_rebuild_are_saved_whole(tmp_path, extra):
    cfg = load_config(None, file_overrides(tmp_path, "train.epochs=1", f"run_dir={tmp_path / 'run'}", *extra))
    run = run_stage3(cfg)
    saved = torch.load(run.path / "ckpt" / "last.pt", weights_only=True)
    assert FROZEN_KEY not in saved and set(saved["model"]) == set(saved["arch"])
    if cfg.model.weights == "file":  # Delta-LoRA moved W: the checkpoint's W is not the file's
        w = next(k for k in saved["model"] if k.endswith("qkv.base_layer.weight"))
        model = built(cfg, saved)
        assert not torch.equal(model.state_dict()[w], saved["model"][w])
        load_model_state(model, saved, "last.pt")
        assert torch.equal(model.state_dict()[w], saved["model"][w])


def test_whole_checkpoint_of_an_older_run_still_loads(tmp_path):
    """A checkpoint written before bodies were left out (every tensor, no digest) loads and exports."""
    cfg = load_config(None, file_overrides(tmp_path, "train.epochs=1", f"run_dir={tmp_path / 'run'}"))
    run = run_stage3(cfg)
    path = run.path / "ckpt" / "best.pt"
    saved = torch.load(path, weights_only=True)
    model = built(cfg, saved)
    load_model_state(model, saved, "best.pt")
    whole = {k: v for k, v in saved.items() if k != FROZEN_KEY}
    whole["model"] = model.state_dict()
    torch.save(whole, path)
    write_body(tmp_path / "body.safetensors", 1)  # a whole checkpoint needs no body file
    assert main(["export", str(run.path), "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    again = build_model(cfg.model, SimpleNamespace(**saved["task_shape"]))
    build_method(cfg.adapter).prepare(again)
    load_model_state(again, whole, "best.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
