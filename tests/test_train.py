"""Stage 3 end to end on a tiny Swin and tiny generated Darcy: learning, resume, and bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from orca.config import load_config
from orca.errors import UsageError
from orca.runs import CheckpointMismatch, RunDir
from orca.train import EpochBatchSampler, run_stage3, warmup_linear_decay


class Killed(Exception):
    """Stands in for SIGKILL: raised from the step callback right after a mid-epoch checkpoint."""


def files_of(path):
    return {p: open(os.path.join(root, p), "rb").read()
            for root, _, names in os.walk(path) for p in names}


def summary(run):
    return json.loads((run.path / "summary.json").read_text())


def test_loss_falls_and_run_directory_is_complete(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=6", "train.lr=3e-3", "train.warmup_epochs=1"])
    run = run_stage3(cfg)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["train/loss"] < 0.6 * epochs[0]["train/loss"], [e["train/loss"] for e in epochs]
    s = summary(run)
    assert s["test"]["rel_l2"] < 0.5 and s["params"]["trainable"] > 0
    assert s["git"]["commit"] and s["train_img_per_s"] > 0 and s["weights"].startswith("none")
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "ckpt/last.pt", "ckpt/best.pt"):
        assert (run.path / name).exists(), name
    assert list((run.path / "tb").iterdir())
    again = load_config(str(run.path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("method", ["full", "dylora"])
def test_killed_mid_epoch_and_resumed_matches_uninterrupted(tiny_overrides, tmp_path, method):
    """Bit-exact resume: same data order, RNG streams, optimizer, schedule and method state."""
    base = tiny_overrides + ["train.epochs=2", "train.batch_size=4", "train.save_every_steps=2",
                             f"adapter.method={method}", "adapter.rank=4", "adapter.dylora_r_max=4"]
    full = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'full'}"]))

    cfg = load_config(None, base + [f"run_dir={tmp_path / 'killed'}"])

    def kill(step):
        if step == 8:  # epoch 2 of 2 (6 steps per epoch), right after the step-8 checkpoint
            raise Killed

    with pytest.raises(Killed):
        run_stage3(cfg, on_step=kill)
    failed = summary(RunDir(tmp_path / "killed"))  # a run that stopped on an error says so, and why
    assert failed["status"] == "failed" and failed["reason"] == "Killed" and failed["step"] == 8
    resumed = run_stage3(load_config(str(tmp_path / "killed" / "config.yaml")))
    a, b = summary(full), summary(resumed)
    assert a["status"] == b["status"] == "finished"
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("full", "killed")}
    epoch_rows = {name: [r for r in rows[name] if r["kind"] == "epoch"] for name in rows}
    # the resumed epoch 2 averages all of its 6 steps (the sums before the kill are in the checkpoint)
    assert [r["train/loss"] for r in epoch_rows["killed"]] == [r["train/loss"] for r in epoch_rows["full"]]
    assert all(r["train/img_per_s"] > 0 for name in rows for r in epoch_rows[name])  # also with mid-epoch saves
    assert [r for r in rows["killed"] if r["kind"] == "train"] == [r for r in rows["full"] if r["kind"] == "train"] \
        or [(r["step"], r["train/loss"]) for r in rows["killed"] if r["kind"] == "train"] == \
        [(r["step"], r["train/loss"]) for r in rows["full"] if r["kind"] == "train"]
    assert a["test"]["rel_l2"] == b["test"]["rel_l2"]
    assert a["val"] == pytest.approx(b["val"]) and a["steps"] == b["steps"] == 12
    last_full = RunDir(tmp_path / "full").load_checkpoint("last")["model"]
    last_res = RunDir(tmp_path / "killed").load_checkpoint("last")["model"]
    for k in last_full:
        torch.testing.assert_close(last_full[k], last_res[k], rtol=0, atol=0, msg=k)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_checkpoint_from_other_model_is_refused_and_nothing_lost(tiny_overrides, tmp_path):
    run_dir = tmp_path / "r"
    run_stage3(load_config(None, tiny_overrides + ["train.epochs=1", f"run_dir={run_dir}"]))
    before = files_of(run_dir)
    other = load_config(None, tiny_overrides + ["train.epochs=1", f"run_dir={run_dir}",
                                                "model.body_kwargs.embed_dim=32"])
    with pytest.raises(UsageError, match=r"^run_dir holds a finished run of another config \(model.body_kwargs.embed_dim: "
                                         r"16 there, 32 here\), run_dir=.*, choose another run_dir"):
        run_stage3(other)  # finished: refused before anything is built
    assert files_of(run_dir) == before
    (run_dir / "summary.json").unlink()  # unfinished: the checkpoint itself is refused
    before = files_of(run_dir)
    with pytest.raises(CheckpointMismatch, match=r"different model: .*differ in shape, e.g. "):
        run_stage3(other)
    assert files_of(run_dir) == before


def test_nan_in_data_is_reported_and_cache_kept(tiny_overrides, tmp_path, monkeypatch):
    """A corrupted cached field must fail loudly, naming the split, and leave the cache in place."""
    import numpy as np

    cfg = load_config(None, tiny_overrides + ["train.epochs=1"])
    run_stage3(cfg)
    target = next((tmp_path / "data").rglob("train.npz"))
    with np.load(target) as z:
        arrays = {k: np.array(z[k]) for k in z.files}
    arrays["sol"][3, 2, 2] = np.nan
    np.savez(target, **arrays)
    snapshot = files_of(tmp_path / "data")
    with pytest.raises(ValueError, match=r"(?i)nan|non-finite"):
        run_stage3(load_config(None, tiny_overrides + ["train.epochs=1"]))
    assert files_of(tmp_path / "data") == snapshot


def test_unknown_key_leaves_existing_run_untouched(tiny_overrides, tmp_path):
    run_dir = tmp_path / "r"
    run_stage3(load_config(None, tiny_overrides + ["train.epochs=1", f"run_dir={run_dir}"]))
    before = files_of(run_dir)
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'; did you mean 'epochs'"):
        load_config(str(run_dir / "config.yaml"), ["train.epoch=3"])
    assert files_of(run_dir) == before


def test_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochBatchSampler(10, 3, seed=4)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip_batches=2)
    assert list(s) == full[2:] and len(s) == 2
    s.set_epoch(3)
    assert list(s) != full and sorted(sum(full, [])) == list(range(10))


def test_warmup_then_linear_decay_to_zero():
    f = warmup_linear_decay(total_steps=10, warmup_steps=2)
    assert [round(f(i), 3) for i in range(11)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def test_diverged_training_stops_with_advice(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=1", "train.lr=1e12", "train.warmup_epochs=0"])
    with pytest.raises(FloatingPointError, match="non-finite training loss .*lower train.lr"):
        run_stage3(cfg)
