"""Judge a knee sweep's plateau pilot by the pre-registered rule (rank_estimation/plateau.py).

    python scripts/plateau_pilot.py results/runs/knee_darcy/lora_r8_s0 --out results/prereg/pilot_knee_darcy.json

Prints one line and exits 0 when the recipe plateaus (the sweep may run), 1 when it does not (double
``train.epochs`` in the task's warm-up and knee files, commit, and repeat the pilot: at most twice),
2 on a usage error. ``--out`` records the rule's inputs and verdict beside the run it judged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from orca.errors import exit_on_error
from orca.runs import write_json
from rank_estimation.plateau import plateau, run_curve


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the pilot's stage-3 run directory (uniform r = 8, seed 0)")
    p.add_argument("--out", type=Path, help="write the verdict here as JSON")
    a = p.parse_args(argv)
    metric, curve = run_curve(a.run_dir)
    result = plateau(curve)
    verdict = "plateau" if result.passed else "NO plateau"
    print(f"[plateau_pilot] {verdict}: {a.run_dir} val/{metric} best of epochs 1-{result.head_epochs} "
          f"{result.best_head:.5g}, of all {result.epochs} {result.best:.5g}: the tail improved it "
          f"{100 * result.improvement:.2f}% ({'<' if result.passed else '>='} {100 * result.tolerance:g}%)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, {"run_dir": str(a.run_dir), "metric": f"val/{metric}", "curve": curve, **result.as_dict()})
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
