"""scripts/bench_train.py --smoke on CPU: every configuration runs, and the numbers it reports add up."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def test_bench_train_smoke(tmp_path):
    rank_map = tmp_path / "rank_map.json"
    rank_map.write_text(json.dumps({"rank_map": {"layers.0.blocks.0": 4, "layers.3.blocks.0.mlp.fc1": 0}}))
    md = load_script("bench_train.py").main(["--smoke", "--rank-map", str(rank_map), "--grad-checkpointing", "0", "1:1",
                             "--methods", "full", "lora", "lora_concat", "lora_inplace", "lora_joined",
                             "lora_fused", "lora_map", "dylora", "delta_lora", "peft", "rank0",
                             "--out", str(tmp_path / "bench")])
    assert md == tmp_path / "bench" / "train_smoke_gc.md"
    out = json.loads((tmp_path / "bench" / "train_smoke_gc.json").read_text())
    assert out["git"]["commit"] and "--smoke" in out["command"] and out["machine"]["torch"]
    assert out["matmul_peak_tflops"] > 0
    rows = {r["config"]: r for r in out["results"]}
    assert list(rows) == ["full", "lora", "lora_concat", "lora_inplace", "lora_joined", "lora_fused", "lora_map",
                          "dylora", "delta_lora", "peft", "rank0",
                          "full+gc", "lora+gc"]
    assert all(r["status"] == "ok" and r["batch"] == 4 and r["img_per_s"] > 0 for r in rows.values())
    # what +gc recomputed: the entries as given (stage 0 whole, first block of stage 1) and per stage
    assert out["settings"]["grad_checkpointing"] == [0, "1:1"]
    assert [rows[k]["grad_checkpointing"] for k in ("lora", "full+gc", "lora+gc")] == [None, [0, "1:1"], [0, "1:1"]]
    assert rows["lora+gc"]["checkpointing"] == "stage 0: 1/1 blocks, stage 1: 1/1 blocks (2 of 4 blocks)"
    assert rows["lora"]["checkpointing"] == "off"
    # tiny Swin: widths 16, 32, 64, 128, one block each; r (4d + 2d + 5d + 5d) LoRA parameters per block
    lora_params = 8 * 16 * (16 + 32 + 64 + 128)
    assert rows["peft"]["trainable_params"] == rows["lora"]["trainable_params"]
    head_and_embed = rows["lora"]["trainable_params"] - lora_params
    # rank map: block 0.0 at r = 4 (half its 2048), fc1 of block 3.0 off (5 * 128 * 8)
    assert rows["lora_map"]["trainable_params"] == head_and_embed + lora_params - 1024 - 5120
    # a LoRA step skips the frozen weights' gradient matmuls; checkpointing recomputes the forward
    f = {k: r["flop_per_step"] for k, r in rows.items()}
    assert 0.5 < f["lora"] / f["full"] < 0.9, f
    assert f["lora"] <= f["peft"] < f["full"]  # same adapters; ours measured ~10% under peft on this body
    assert f["lora_map"] < f["lora"] and f["full+gc"] > 1.1 * f["full"]
    # rank0: no adapters, only the head and the patch embedding (4 x 4 x 3 conv to 16 channels + its
    # LayerNorm) train, yet the input gradient crosses every block: more than a forward, less than LoRA
    assert head_and_embed == 128 * 100 + 100
    assert rows["rank0"]["trainable_params"] == head_and_embed + (3 * 16 * 16 + 16) + 2 * 16
    assert f["rank0"] < f["lora"] and f["rank0"] > 0.5 * f["lora"]
    # the one-GEMM forward does the multiply-adds of the base GEMM plus the rank-r update, which the
    # default path does in place (addmm_, which torch's FLOP counter alone would not count)
    for pinned in ("lora_concat", "lora_inplace", "lora_joined", "lora_fused"):
        assert rows[pinned]["trainable_params"] == rows["lora"]["trainable_params"]
        assert f[pinned] == f["lora"], pinned
    for r in rows.values():
        assert r["mfu"] == pytest.approx(r["flop_per_step"] / 4 * r["img_per_s"] / (out["matmul_peak_tflops"] * 1e12),
                                         rel=0.01 + 0.05 / r["img_per_s"])  # img/s is rounded to 0.1
    assert not any(r["compiled"] for r in rows.values())
    text = md.read_text()
    assert "| 4 | lora_map |" in text and "| vs peft (eager) |" in text
    assert ("`full+gc`, `lora+gc`: activation checkpointing `--grad-checkpointing 0 1:1` = stage 0: 1/1 blocks, "
            "stage 1: 1/1 blocks (2 of 4 blocks).") in text


def test_bench_train_eager_methods_need_compile_and_are_named(tmp_path, capsys):
    script = load_script("bench_train.py")
    with pytest.raises(SystemExit):
        script.parse_args(["--smoke", "--eager-methods", "peft"])
    assert "--eager-methods only means something with --compile" in capsys.readouterr().err
    args = script.parse_args(["--compile", "--compile-mode", "reduce-overhead", "--eager-methods", "peft",
                              "--methods", "full", "lora", "peft"])
    assert script.compiled_label(args) == "torch.compile, mode reduce-overhead; eager: peft"
    assert script.compiled_label(script.parse_args(["--methods", "full"])) == "eager"
    # the reference's mode, named in the markdown's "vs peft" column: compiled unless left eager
    assert script.peft_mode(args) == "eager"
    assert script.peft_mode(script.parse_args(["--compile", "--methods", "full", "peft"])) == "compiled"
    assert script.peft_mode(script.parse_args(["--compile", "--compile-mode", "reduce-overhead", "--methods",
                                               "peft"])) == "compiled, reduce-overhead"
    assert script.peft_mode(script.parse_args(["--methods", "full", "peft"])) == "eager"


def test_bench_train_refuses_checkpointing_past_a_stage_before_timing(capsys):
    with pytest.raises(SystemExit):
        load_script("bench_train.py").parse_args(["--smoke", "--grad-checkpointing", "2:30"])
    assert "entry '2:30': stage 2 has 1 block, so K must be in 1..1" in capsys.readouterr().err


def test_bench_train_times_both_attention_kinds_in_one_run(tmp_path):
    md = load_script("bench_train.py").main(["--smoke", "--methods", "full", "lora", "--attention", "bmm", "sdpa",
                                             "--out", str(tmp_path)])
    assert md == tmp_path / "train_smoke_sdpa.md"
    rows = {r["config"]: r for r in json.loads((tmp_path / "train_smoke_sdpa.json").read_text())["results"]}
    assert list(rows) == ["full", "lora", "full+sdpa", "lora+sdpa"]
    assert [r["attention"] for r in rows.values()] == ["bmm", "bmm", "sdpa", "sdpa"]
    assert rows["lora+sdpa"]["trainable_params"] == rows["lora"]["trainable_params"]
    text = md.read_text()
    # ratios compare rows of one kind: full+sdpa is its own 1.00x, and each pair gets its sdpa/bmm line
    assert "| 4 | full+sdpa |" in text and text.count("| 1.00x |") >= 2
    ratio = rows["lora+sdpa"]["img_per_s"] / rows["lora"]["img_per_s"]
    assert f"| 4 | lora | {ratio:.2f}x |" in text


def test_rank0_backpropagates_through_every_frozen_block():
    """The floor a LoRA step is priced against (scripts/kernel_budget.py) must do LoRA's backward minus
    the adapters: a gradient at the patch embedding, none on any block weight, no LoRA layer."""
    import torch

    from orca.adapters.lora import LoRALinear
    from orca.bench import build_config, train_step

    script = load_script("bench_train.py", "bench_train_rank0")
    cfg = build_config("rank0", model_name="swin_tiny_patch4_window7_224", device=torch.device("cpu"),
                       num_classes=5, body_kwargs=dict(script.SMOKE_BODY))
    body = cfg["model"].body
    assert not any(isinstance(m, LoRALinear) for m in body.modules())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    before = body.patch_embed.proj.weight.detach().clone()
    cfg["opt"].zero_grad = lambda set_to_none=True: None  # keep this step's gradients to look at
    train_step(cfg, x, y)
    assert body.patch_embed.proj.weight.grad is not None and body.patch_embed.proj.weight.grad.abs().sum() > 0
    assert not torch.equal(body.patch_embed.proj.weight, before)
    trained = {n for n, p in body.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in body.patch_embed.named_parameters(prefix="patch_embed")}


def test_a_configuration_that_fails_is_reported_and_the_rest_timed(tmp_path, monkeypatch):
    """A configuration that cannot be built or compiled (say peft under torch.compile) costs its own
    row, not the call: the others are timed and both files are written."""
    script = load_script("bench_train.py", "bench_train_failing")
    real = script.build_config

    def build(method, **kwargs):
        if method == "peft":
            raise RuntimeError("peft does not compile here")
        return real(method, **kwargs)

    monkeypatch.setattr(script, "build_config", build)
    md = script.main(["--smoke", "--methods", "full", "peft", "--out", str(tmp_path)])
    rows = {r["config"]: r for r in json.loads((tmp_path / "train_smoke.json").read_text())["results"]}
    assert rows["full"]["status"] == "ok" and rows["full"]["img_per_s"] > 0
    assert rows["peft"]["status"] == "failed (RuntimeError)"
    assert "| 4 | peft | failed (RuntimeError) |" in md.read_text()
