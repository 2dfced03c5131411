"""The Darcy generation benchmark runs and its accuracy check compares like with like."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_darcy_smoke(tmp_path):
    out = tmp_path / "darcy"
    subprocess.run([sys.executable, "scripts/bench_darcy.py", "--resolution", "41", "--n-train", "3", "--n-test", "1",
                    "--check", "2", "--workers", "1", "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["samples"] == 4 and result["seconds"] > 0
    assert result["max_rel_l2_vs_spsolve"] < 1e-9  # our multifrontal solve == SuperLU's pivoted solve
    assert "| 4 | 41 -> 9 |" in out.with_suffix(".md").read_text()
