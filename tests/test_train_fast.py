"""Stage 3's memory / speed switches change cost, never results: per-stage activation checkpointing."""
from __future__ import annotations

import json

import pytest

from datasets.registry import build_task
from orca.checkpointing import set_checkpointing
from orca.config import load_config
from orca.model import build_model
from orca.schema import ConfigError
from orca.train import run_stage3


def test_stage_checkpointing_gives_the_same_run(tiny_overrides, tmp_path):
    """Recomputing stages 0-1 in backward (drop-path RNG replayed) reproduces the plain run's numbers."""
    base = tiny_overrides + ["train.epochs=1", "adapter.method=lora", "adapter.rank=4"]
    plain = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'plain'}"]))
    ckpt = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'gc'}", "train.grad_checkpointing=[0, 1]"]))
    a, b = (json.loads((r.path / "summary.json").read_text()) for r in (plain, ckpt))
    assert b["test"]["rel_l2"] == pytest.approx(a["test"]["rel_l2"], rel=1e-6, abs=0)
    rows = [[json.loads(x)["train/loss"] for x in (r.path / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"] for r in (plain, ckpt)]
    assert len(rows[0]) == 3 and rows[1] == pytest.approx(rows[0], rel=1e-6)


def test_checkpointing_is_switched_on_in_the_listed_stages_only(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    model = build_model(cfg.model, build_task(cfg.task.name, cfg.task.options, cfg.task.data_root))
    set_checkpointing(model.body, [0, 2])
    assert [layer.grad_checkpointing for layer in model.body.layers] == [True, False, True, False]


def test_checkpointing_a_missing_stage_is_refused(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.grad_checkpointing=[4]"])
    with pytest.raises(ConfigError, match=r"stage 4 does not exist; the body has 4 stages \(0..3\)"):
        run_stage3(cfg)
    with pytest.raises(ConfigError, match="distinct 0-based stage indices"):
        load_config(None, tiny_overrides + ["train.grad_checkpointing=[0, 0]"])


@pytest.mark.parametrize("mode,graphs", [(None, False), ("default", False), ("reduce-overhead", True),
                                         ("max-autotune", True), ("max-autotune-no-cudagraphs", False)])
def test_which_compile_modes_record_cuda_graphs(mode, graphs):
    """max-autotune records CUDA graphs too: its training steps need the same step marks as
    reduce-overhead's, and benchmarks must not report its graph pool as a peak. The cudagraphs
    backend records them in its only mode."""
    from orca.train import uses_cuda_graphs

    assert uses_cuda_graphs(mode) is graphs and uses_cuda_graphs(mode, "inductor") is graphs
    assert uses_cuda_graphs("default", "cudagraphs") is True


def test_compile_backend_is_checked(tiny_overrides):
    """An unknown backend, or an inductor mode with the cudagraphs backend, is refused in one line
    when the config is read (before any run starts)."""
    cfg = load_config(None, tiny_overrides + ["train.compile=true", "train.compile_backend=cudagraphs"])
    assert cfg.train.compile_backend == "cudagraphs" and cfg.train.compile_mode == "default"
    assert load_config(None, tiny_overrides).train.compile_backend == "inductor"
    with pytest.raises(ConfigError, match=r"^train.compile_mode=reduce-overhead is an inductor mode; with "
                                          r"train.compile_backend=cudagraphs leave it at default$"):
        load_config(None, tiny_overrides + ["train.compile_backend=cudagraphs", "train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"train.compile_backend.*'tvm'.*inductor.*cudagraphs"):
        load_config(None, tiny_overrides + ["train.compile_backend=tvm"])


def test_cudagraphs_backend_trains_the_run_the_traced_step_trains(tiny_overrides, tmp_path, monkeypatch):
    """A run alone with ``train.compile_backend=cudagraphs`` compiles its step with that backend and
    trains the numbers of the same traced step run eagerly (``aot_eager``): on a CPU the backend
    records no graph, so this checks that the choice reaches stage 3 and changes no result."""
    import torch

    compile_ = torch.compile
    backends = []

    def recording(fn, mode=None, backend="inductor"):
        backends.append(backend)
        return compile_(fn, mode=mode, backend="aot_eager" if backend == "inductor" else backend)

    monkeypatch.setattr(torch, "compile", recording)
    base = tiny_overrides + ["train.epochs=1", "adapter.method=lora", "adapter.rank=4", "train.compile=true"]
    traced = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'traced'}"]))
    graphs = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'graphs'}", "train.compile_backend=cudagraphs"]))
    assert backends == ["inductor", "cudagraphs"]
    a, b = (json.loads((r.path / "summary.json").read_text()) for r in (traced, graphs))
    assert b["test"]["rel_l2"] == pytest.approx(a["test"]["rel_l2"], rel=1e-6, abs=0)
    assert "compile_backend: cudagraphs" in (graphs.path / "config.yaml").read_text()


def test_compiled_run_trains_the_eager_runs_data(tiny_overrides, tmp_path, monkeypatch):
    """20 samples at batch 8 make two full batches and one of 4 per epoch. Compiled, the run still
    trains all three (the data of the eager run, to rounding): the compiled step sees the full
    batches only, so it keeps one static shape, and the last batch goes through the same model
    uncompiled."""
    import torch

    compile_ = torch.compile
    seen = []

    def recording(fn, mode=None, backend="inductor"):
        compiled = compile_(fn, mode=mode, backend="aot_eager")
        return lambda x: seen.append(len(x)) or compiled(x)

    monkeypatch.setattr(torch, "compile", recording)
    base = tiny_overrides + ["train.epochs=2", "adapter.method=lora", "adapter.rank=4", "task.options.n_train=20"]
    eager = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'eager'}"]))
    compiled = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'compiled'}", "train.compile=true"]))
    assert seen == [8, 8] * 2  # two epochs of two full batches; the batches of 4 ran eagerly
    rows = [[json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()] for r in (eager, compiled)]
    steps = [[r["step"] for r in run if r["kind"] == "train"] for run in rows]
    assert steps[0] == steps[1] == [1, 2, 3, 4, 5, 6]  # three optimizer steps an epoch
    for a, b in zip(*rows):
        if a["kind"] == "train":
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    a, b = (json.loads((r.path / "summary.json").read_text()) for r in (eager, compiled))
    assert b["test"]["rel_l2"] == pytest.approx(a["test"]["rel_l2"], rel=1e-5)
