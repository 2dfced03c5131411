"""scripts/bench_ddp.py on CPU (--smoke): bench_train.py alone, then under torchrun with 2 gloo processes,
joined into one scaling table whose figures are the two runs' own."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def test_bench_ddp_smoke_joins_one_and_two_process_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    md = load_script("bench_ddp.py").main(["--smoke", "--out", str(tmp_path)])
    assert md == tmp_path / "train_smoke_ddp.md"
    one = json.loads((tmp_path / "train_smoke_ddp_1gpu.json").read_text())
    two = json.loads((tmp_path / "train_smoke_ddp_2gpu.json").read_text())
    joined = json.loads((tmp_path / "train_smoke_ddp.json").read_text())
    assert two["command"].startswith("torchrun --standalone --nproc_per_node=2 ")
    assert {r["world_size"] for r in one["results"]} == {1} and {r["world_size"] for r in two["results"]} == {2}
    for r in two["results"]:  # the 2-process figure counts both ranks' images
        assert r["img_per_s"] == pytest.approx(2 * r["img_per_s_per_gpu"], abs=0.15)  # each figure rounded to 0.1
    base = {(r["config"], r["batch"]): r["img_per_s"] for r in one["results"]}
    rows = {(r["config"], r["batch"]): r for r in joined["results"]}
    assert set(rows) == {("full", 4), ("lora", 4)} and joined["gpus"] == 2
    for key, r in rows.items():
        assert r["img_per_s_1gpu"] == base[key]
        assert r["scaling"] == pytest.approx(r["img_per_s_2gpu"] / base[key], abs=5e-4)  # rounded to 0.001
        assert r["efficiency"] == pytest.approx(r["scaling"] / 2, abs=1e-3)
    text = md.read_text()
    assert "| 4 | lora |" in text and "nproc_per_node=2" in text


def test_bench_ddp_needs_two_gpus(capsys):
    with pytest.raises(SystemExit):
        load_script("bench_ddp.py").parse_args(["--gpus", "1"])
    assert "scaling needs at least 2 GPUs for the DDP run, got 1" in capsys.readouterr().err
