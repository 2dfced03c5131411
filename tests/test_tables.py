"""scripts/make_tables.py on hand-written summaries: statistics, seed numbers, links, determinism.

Expected values are computed by hand in the comments; nothing here trains a model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

make_tables = load_script("make_tables.py")

REFERENCE = {
    "source": "test reference", "body": "Swin-B",
    "tables": {
        "table1_small": {"setup": "t1 setup", "rows": [{"model": "ORCA (50 epochs)", "trainable_params_M": 90, "error": 0.0664}]},
        "table2_darcy": {"setup": "t2 setup", "rows": [
            {"model": "Fine-tune", "trainable_params_M": 90, "error": 0.0078},
            {"model": "LoRA r=1", "trainable_params_M": 0.08, "error": 0.0968},
            {"model": "LoRA r=8", "trainable_params_M": 0.6, "error": 0.0797},
            {"model": "LoRA r=16", "trainable_params_M": 1.2, "error": 0.0782}]},
    },
}


def write_run(root: Path, table: str, name: str, method: str, rank, seed: int, error: float, *,
              trainable: int, adapters: int, epochs: int = 20, sweep: bool = True) -> Path:
    run_dir = root / table / name
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "stage": "stage3", "task": "darcy", "seed": seed, "method": method, "body": "tiny_swin",
        "weights": "none (random init)", "metric": "rel_l2", "test": {"rel_l2": error, "loss": 1.0},
        "val": {"rel_l2": error}, "epochs": epochs,
        "params": {"trainable": trainable, "adapters": adapters, "embedder": 0, "head": trainable - adapters,
                   "other": 0, "body": 12_200_000, "body_fraction": 0.0}}))
    if sweep:
        (run_dir / "sweep.json").write_text(json.dumps({
            "table": table, "row": name.rsplit("_s", 1)[0], "seed": seed, "method": method, "rank": rank,
            "point": {"seed": seed, **({"adapter.rank": rank} if rank else {})}}))
    return run_dir


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "results" / "runs"
    for seed, err in ((0, 0.10), (1, 0.12), (2, 0.14)):
        write_run(root, "table2", f"lora_r1_s{seed}", "lora", 1, seed, err, trainable=150_000, adapters=72_192)
    write_run(root, "table2", "lora_r8_s0", "lora", 8, 0, 0.08, trainable=655_536, adapters=577_536)
    write_run(root, "table2", "lora_r2_s0", "lora", 2, 0, 0.09, trainable=222_384, adapters=144_384)
    write_run(root, "table2", "full_s0", "full", None, 0, 0.0123, trainable=12_345_678, adapters=0)
    write_run(root, "table2", "full_s1", "full", None, 1, 0.0125, trainable=12_345_678, adapters=0)
    write_run(root.parent / "demo", "", "stage3", "lora", None, 0, 0.0566, trainable=500_000, adapters=120_000,
              sweep=False)  # outside the scanned root: must not appear
    return root


def render(root: Path, reference=REFERENCE) -> str:
    md, tex, warnings = make_tables.make_tables(root, root.parent / "tables.md", reference)
    assert warnings == []
    return md


def line_of(md: str, label: str) -> str:
    matches = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
    assert len(matches) == 1, (label, matches)
    return matches[0]


def test_mean_std_seed_numbers_and_links(runs_root):
    md = render(runs_root)
    # r=1 errors 0.10, 0.12, 0.14: mean 0.12; sample variance (0.02^2 + 0 + 0.02^2) / 2 = 0.0004 -> std 0.02
    r1 = line_of(md, "LoRA r=1")
    assert "| 0.08 | 0.0968 |" in r1  # the seed's numbers beside ours
    assert "| 0.1200 ± 0.0200 |" in r1
    assert "[0.15](runs/table2/lora_r1_s0)" in r1  # 150,000 trainable parameters = 0.15M
    assert "| 0.0722 |" in r1  # 72,192 adapter parameters
    for seed, err in ((0, "0.1000"), (1, "0.1200"), (2, "0.1400")):
        assert f"[s{seed}: {err}](runs/table2/lora_r1_s{seed})" in r1
    assert "| 0.0800 (n=1) |" in line_of(md, "LoRA r=8")
    # full fine-tuning sits beside the seed's "Fine-tune": (0.0123 + 0.0125) / 2 = 0.0124, std sqrt(2e-8) = 0.000141
    full = line_of(md, "Fine-tune")
    assert "| 90 | 0.0078 |" in full and "| 0.0124 ± 0.0001 |" in full and "[12.3](runs/table2/full_s0)" in full
    assert "| no runs |" in line_of(md, "LoRA r=16")  # a seed row we did not run stays, marked
    assert "| LoRA r=2 | n/a | n/a |" in md  # ours without a seed row come after the seed's rows
    assert md.index("| LoRA r=16 |") < md.index("| LoRA r=2 |")
    assert "- Epochs used (ours): 20" in md
    assert "**no runs**: no finished stage-3 run tagged table1" in md  # Table 1 has none
    assert "0.0566" not in md


def test_output_is_byte_identical_and_check_detects_staleness(runs_root, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(REFERENCE))
    out = runs_root.parent / "tables.md"
    args = ["--root", str(runs_root), "--out", str(out), "--reference", str(ref)]
    assert make_tables.main(args) == 0
    first_md, first_tex = out.read_bytes(), out.with_suffix(".tex").read_bytes()
    assert make_tables.main(args) == 0
    assert out.read_bytes() == first_md and out.with_suffix(".tex").read_bytes() == first_tex
    assert make_tables.main(args + ["--check"]) == 0
    assert b"\\href{runs/table2/lora_r1_s0}{0.15}" in first_tex and b"0.1200 $\\pm$ 0.0200" in first_tex
    write_run(runs_root, "table2", "lora_r16_s0", "lora", 16, 0, 0.07, trainable=1_300_000, adapters=1_155_072)
    assert make_tables.main(args + ["--check"]) == 1
    assert out.read_bytes() == first_md  # --check writes nothing


def test_without_reference_seed_columns_are_na(runs_root):
    md = render(runs_root, reference=None)
    assert "| LoRA r=1 | n/a | n/a |" in md
    assert "reference file not found" in md


def test_mixed_epochs_and_untagged_runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "table2", "lora_r1_s0", "lora", 1, 0, 0.1, trainable=1, adapters=1, epochs=20)
    write_run(root, "table2", "lora_r1_s1", "lora", 1, 1, 0.1, trainable=1, adapters=1, epochs=50)
    run = write_run(root, "misc", "x", "lora", None, 0, 0.2, trainable=1, adapters=1, sweep=False)
    (run / "config.yaml").write_text("adapter: {method: lora, rank: 4}\n")
    md = render(root)
    assert "- Epochs used (ours): 20, 50 (differs by row" in md
    assert "| 20/50 |" in line_of(md, "LoRA r=1")
    assert "## untagged (not a seed table)" in md and "| LoRA r=4 (experiment=?, task=darcy) | n/a | n/a |" in md
