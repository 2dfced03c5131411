"""Write the equal-budget comparison's four rank maps per budget: the stage-2 map and its three placebos.

    python scripts/placebo_maps.py --out results/runs/placebo_maps/darcy \\
        --stage2 results/runs/prereg_stage2/darcy_b99584 results/runs/prereg_stage2/darcy_b398336 \\
                 results/runs/prereg_stage2/darcy_b1593344 --budgets 99584 398336 1593344

For each stage-2 run directory (its ``rank_map.json`` and ``config.yaml``) and the nominal budget it
was allocated at, writes ``{arm}_b{budget}.json`` for arm in stage2 / uniform / shuffled / depth:
the stage-2 map itself and the placebos of ``rank_estimation.placebo`` with exactly its module set
and adapter parameter count. Stage 3 reads each through ``adapter.rank_map=FILE``; the file stem
names the run (``lora_rankmap_rank_map-shuffled-b99584_s0``) and tells the analysis its arm and budget.
``bash scripts/reproduce.sh prereg_placebo OUT`` runs the stage-2 maps, this and the sweeps in order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from orca.cli import CONFIG_SCHEMA
from orca.config import load_config
from orca.errors import exit_on_error
from orca.runs import write_json
from rank_estimation.allocate import costs_from_model
from rank_estimation.placebo import adapter_params, depth_only_map, shuffled_gap_map, uniform_map
from rank_estimation.stage import RANK_MAP_FILE, body_only

SHUFFLE_SEED = 0


def maps_for(run_dir: Path) -> dict:
    """The stage-2 map of ``run_dir`` and its three placebos, each with its parameter count."""
    payload = json.loads((run_dir / RANK_MAP_FILE).read_text())
    cfg = load_config(str(run_dir / "config.yaml"), schema=CONFIG_SCHEMA)  # a stage-2 run: its rank section
    costs = costs_from_model(body_only(cfg.model), payload.get("targets", cfg.rank.targets))
    stage2 = {m: int(r) for m, r in payload["rank_map"].items()}
    profile = payload["gap_profile"]
    gaps = dict(zip(profile["layers"], profile["D"]))
    kw = dict(r_min=cfg.rank.r_min, r_max=cfg.rank.r_max)
    maps = {"stage2": stage2, "uniform": uniform_map(stage2, costs, **kw),
            "shuffled": shuffled_gap_map(gaps, stage2, costs, seed=SHUFFLE_SEED, **kw),
            "depth": depth_only_map(list(gaps), stage2, costs, **kw)}
    return {arm: {"rank_map": m, "params": adapter_params(m, costs)} for arm, m in maps.items()}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage2", type=Path, nargs="+", required=True, help="stage-2 run directories, one per budget")
    p.add_argument("--budgets", type=int, nargs="+", required=True, help="the nominal budget of each, same order")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if len(a.stage2) != len(a.budgets):
        p.error(f"{len(a.stage2)} stage-2 runs but {len(a.budgets)} budgets: give one budget per run")
    a.out.mkdir(parents=True, exist_ok=True)
    for run_dir, budget in zip(a.stage2, a.budgets):
        for arm, m in maps_for(run_dir).items():
            write_json(a.out / f"{arm}_b{budget}.json", {**m, "arm": arm, "budget": budget, "stage2_run": str(run_dir),
                                                         "shuffle_seed": SHUFFLE_SEED if arm == "shuffled" else None})
            print(f"[placebo_maps] {arm}_b{budget}: {m['params']:,} adapter parameters")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
