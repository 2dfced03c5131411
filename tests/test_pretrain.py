"""Stage 0: a tiny fractal pretraining run learns, its body file loads everywhere bodies load, bad input fails clearly.

One tiny run (5 classes, 32 px, a 4-block Swin of width 16) is shared by the module; on 2 CPU cores the
file takes well under a minute.
"""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import orca.pretrain as pretrain
from datasets.registry import build_task
from orca.bodies import WeightsError, create_body, read_body_meta
from orca.cli import CONFIG_SCHEMA, main as cli_main
from orca.config import load_config, read_yaml
from orca.errors import UsageError
from orca.model import build_model
from orca.schema import ConfigError
from tests.conftest import TINY_BODY

REPO = Path(__file__).resolve().parents[1]
BODY = "swin_tiny_patch4_window7_224"
TINY_KWARGS = "{embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 2}"


def stage0_overrides(out: Path) -> list:
    """5 fractal classes at 32 px: separable enough that a few dozen steps beat chance clearly."""
    return [
        "name=tiny", f"output_dir={out}", "seed=0",
        "task.name=fractal", "task.options.num_classes=5", "task.options.train_per_class=8",
        "task.options.val_per_class=4", "task.options.test_per_class=1", "task.options.image_size=32",
        "task.options.num_points=2000", "task.options.augment=true",
        f"model.body={BODY}", "model.weights=none", "model.img_size=32", f"model.body_kwargs={TINY_KWARGS}",
        "train.epochs=6", "train.warmup_epochs=1", "train.batch_size=8", "train.lr=2e-3", "train.device=cpu",
        "train.deterministic=true", "train.log_every=1", "train.eval_every=3",
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One stage-0 run through the CLI entry point (``python -m orca stage0``)."""
    out = tmp_path_factory.mktemp("stage0")
    assert cli_main(["stage0", *stage0_overrides(out / "runs")]) == 0
    (run_dir,) = (out / "runs").iterdir()
    return run_dir


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def test_tiny_run_learns_and_writes_its_run_directory(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "stage0.log", "body.safetensors"):
        assert (tiny_run / name).is_file(), name
    s = _summary(tiny_run)
    assert s["classes"] == 5 and s["train_images"] == 40 and s["val_images"] == 20
    assert s["steps"] == 30 and s["images_seen"] == 240 and s["stopped_by"] == "epochs"
    first, last = s["first_last_logged_loss"]
    assert last < 0.6 * first, (first, last)  # ln 5 = 1.61 at the start
    assert s["val"]["top1"] >= 0.5 > s["val"]["chance"] == 0.2  # chance is 0.2
    ckpt = tiny_run / "body.safetensors"
    assert s["checkpoint"]["path"] == str(ckpt) and s["checkpoint"]["bytes"] == ckpt.stat().st_size
    assert s["git"]["commit"] and s["machine"]["torch"] and s["train_img_per_s"] > 0
    evals = [r for r in _metrics(tiny_run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 15, 30]  # start, epoch 3, end
    assert "val top-1" in (tiny_run / "stage0.log").read_text()


def test_saved_body_loads_as_a_file_body_with_identical_tensors(tiny_run):
    path = tiny_run / "body.safetensors"
    saved = load_file(str(path))
    assert not any(k.startswith("head.") for k in saved)
    meta = read_body_meta(path)
    assert meta == {"model": BODY, "kwargs": {**TINY_BODY, "img_size": 32}}
    body = create_body(BODY, weights="file", weights_file=str(path), img_size=32, **TINY_BODY)
    state = body.state_dict()
    assert saved.keys() <= state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert body.orca_weights == f"file:{path}"


def test_saved_body_feeds_a_stage3_model(tiny_run):
    path = tiny_run / "body.safetensors"
    cfg = load_config(None, [
        "task.name=fractal_heldout", "task.options.num_classes=3", "task.options.train_per_class=2",
        "task.options.val_per_class=1", "task.options.test_per_class=1", "task.options.image_size=32",
        "task.options.num_points=1000", f"model.body={BODY}", "model.img_size=32",
        f"model.body_kwargs={TINY_KWARGS}", "model.weights=file", f"model.weights_file={path}"])
    task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
    model = build_model(cfg.model, task)
    saved = load_file(str(path))
    body_state = model.body.state_dict()
    for k, v in saved.items():
        if k.startswith("patch_embed."):  # moved to the embedder, which starts from it (ORCA's source init)
            assert torch.equal(model.embedder.state_dict()[k[len("patch_embed."):]], v)
        else:
            assert torch.equal(body_state[k], v), k
    x, _ = task.train.get_batch([0, 1])
    assert model(x).shape == (2, 3)


def test_export_copies_verifies_and_records_the_checkpoint(tiny_run, tmp_path):
    dest = pretrain.export_checkpoint(str(tiny_run), str(tmp_path / "checkpoints" / "fractal_tiny.safetensors"))
    assert dest.read_bytes() == (tiny_run / "body.safetensors").read_bytes()
    assert _summary(tiny_run)["exported_checkpoint"]["sha256"] == _summary(tiny_run)["checkpoint"]["sha256"]
    with pytest.raises(UsageError, match="no body.safetensors in the run directory, .*give a finished stage-0 run"):
        pretrain.export_checkpoint(str(tmp_path), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# the time budget
# ------------------------------------------------------------------------------------------------
class FakeClock:
    """time.time() that advances a fixed tick per call: a time-budgeted run becomes deterministic."""

    def __init__(self, tick: float):
        self.now, self.tick = 1_000_000.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now


def _budgeted_cfg(out: Path, budget: float):
    cfg = load_config(None, [*stage0_overrides(out), "train.epochs=1000", "train.warmup_epochs=50",
                             "train.eval_every=1000"])
    cfg.pretrain.time_budget_s = budget
    return cfg


def test_time_budget_ends_the_run_with_the_learning_rate_at_zero(tmp_path, monkeypatch):
    clock = FakeClock(tick=0.1)
    monkeypatch.setattr(pretrain, "time", types.SimpleNamespace(time=clock.time, strftime=time.strftime))
    run = pretrain.run_stage0(_budgeted_cfg(tmp_path / "runs", budget=9.0))
    s = _summary(run.path)
    train = [r for r in _metrics(run.path) if r["kind"] == "train"]
    assert s["stopped_by"] == "time_budget" and 3 <= s["steps"] < 5 * 1000
    assert s["time_budget_s"] == 9.0 and s["wall_time_s"] <= 9.0
    lrs = [r["train/lr"] for r in train]
    assert max(lrs) <= 2e-3 and lrs[-1] < 0.25 * max(lrs)  # warm-up, then linear decay towards 0


def test_time_budget_spent_before_training_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="time_budget_s=0.001 is spent before training starts"):
        pretrain.run_stage0(_budgeted_cfg(tmp_path / "runs", budget=1e-3))
    (run_dir,) = (tmp_path / "runs").iterdir()  # the run had begun: it says it failed, and why
    s = _summary(run_dir)
    assert s["status"] == "failed" and s["stage"] == "stage0"
    assert s["reason"].startswith("RuntimeError: ") and "time_budget_s=0.001 is spent before training" in s["reason"]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_file_of_another_variant_is_refused(tiny_run):
    path = str(tiny_run / "body.safetensors")
    other = {**TINY_BODY, "embed_dim": 32}
    with pytest.raises(WeightsError, match="was saved for a Swin with .*embed_dim.*16"):
        create_body(BODY, weights="file", weights_file=path, img_size=32, **other)
    with pytest.raises(WeightsError, match="holds weights of swin_tiny_patch4_window7_224, but model.body="):
        create_body("swin_small_patch4_window7_224", weights="file", weights_file=path, img_size=32, **TINY_BODY)


def test_missing_weights_file_is_refused(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsError, match="body weights file not found: .*nowhere.safetensors"):
        create_body(BODY, weights="file", weights_file=str(missing), img_size=32, **TINY_BODY)
    cfg = load_config(None, [*stage0_overrides(tmp_path), "model.weights=file", f"model.weights_file={missing}"])
    with pytest.raises(WeightsError, match="stage0_pretrain.sh"):
        pretrain.run_stage0(cfg)


def test_zero_classes_and_non_classification_tasks_are_refused():
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1, got 0"):
        load_config(None, ["task.name=fractal", "task.options.num_classes=0"])
    cfg = load_config(None, ["task.name=fractal"])
    one_class = types.SimpleNamespace(kind="classification", out_shape=(1,))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        pretrain.check_stage0_inputs(cfg, one_class)
    dense = types.SimpleNamespace(kind="dense", out_shape=(85, 85))
    with pytest.raises(ConfigError, match="stage 0 pretrains a classifier"):
        pretrain.check_stage0_inputs(cfg, dense)
    cfg.pretrain.time_budget_s = 0
    with pytest.raises(ConfigError, match="pretrain.time_budget_s must be > 0"):
        pretrain.check_stage0_inputs(cfg, types.SimpleNamespace(kind="classification", out_shape=(5,)))


# ------------------------------------------------------------------------------------------------
# the shipped configs
# ------------------------------------------------------------------------------------------------
def test_body_fragment_selects_the_committed_checkpoint(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {REPO / 'configs' / 'body_fractal.yaml'}\ntask: {{name: fractal_heldout}}\n")
    cfg = load_config(str(exp), schema=CONFIG_SCHEMA)
    assert cfg.model.weights == "file"
    assert cfg.model.weights_file == "results/checkpoints/fractal_swin.safetensors"
    assert cfg.model.body_kwargs == {"embed_dim": 64, "depths": [2, 2, 6, 2], "num_heads": [2, 4, 8, 16]}
    assert cfg.task.name == "fractal_heldout"


def test_stage0_config_pretrains_the_body_of_the_fragment():
    raw = read_yaml(REPO / "configs" / "stage0_fractal.yaml")
    body = read_yaml(REPO / "configs" / "body_fractal.yaml")["model"]
    assert {k: raw["model"][k] for k in ("body", "body_kwargs", "img_size")} == \
        {k: body[k] for k in ("body", "body_kwargs", "img_size")}
    assert raw["task"]["options"]["image_size"] == body["img_size"]
    cfg = load_config(str(REPO / "configs" / "stage0_fractal.yaml"), schema=CONFIG_SCHEMA)
    assert cfg.model.weights == "none" and cfg.task.name == "fractal"
    assert cfg.pretrain.time_budget_s == 480 and cfg.pretrain.label_smoothing == 0.1


@pytest.mark.gpu
def test_tiny_run_on_cuda_renders_trains_and_saves_there(tmp_path):
    """The CUDA-only paths: GPU-resident render, pinned augmentation, bf16 autocast, fused AdamW, memory check."""
    cfg = load_config(None, [*stage0_overrides(tmp_path / "runs"), "train.device=cuda", "train.deterministic=false"])
    run = pretrain.run_stage0(cfg)
    s = _summary(run.path)
    assert s["val"]["top1"] >= 0.5 and s["peak_gpu_mem_gib"] > 0 and s["optim"]["amp"] == "auto"
    body = pretrain.load_saved_body(run.path / "body.safetensors")
    assert body.orca_weights.startswith("file:")
