"""The committed runs as the rank-gap hypothesis tests read them: stage-3 results as :class:`Run`
records, stage-2 gap profiles per task, and the pre-registered sweeps' records.

Why a module of its own: what counts as evidence (finished runs of one body, complete sweeps only,
AdaLoRA's live budget) is a decision the report must state and the tests must pin, apart from how
the analyses then use it. Everything here reads ``summary.json``, ``config.yaml``, ``sweep.json``,
``rank_map.json`` and ``gaps.json`` files; nothing trains or writes.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import yaml

from orca.schema import ConfigError
from orca.sweep import load_sweep
from rank_estimation.config import Stage2Config
from rank_estimation.preregistered import task_key

#: The repository root: sweep files are recorded relative to it (``sweep.json``).
REPO = Path(__file__).resolve().parents[1]
PREREG_TABLES = ("warmup_", "knee_", "placebo_", "aligned_")      # the pre-registered sweeps (table prefixes)
PREREG_GAPS = "prereg_gaps"                                       # experiment name of their stage-2 gap runs
PREREG_GAPS_ALIGNED = "prereg_gaps_aligned"                       # ... and of those with a stage-1 embedder
PREREG_EXPERIMENTS = "prereg_"   # experiment-name prefix of every pre-registered stage-2 run (gaps, placebo maps)


@dataclass
class Run:
    path: Path
    task: str
    variant: str          # "uniform", "adaptive", "adalora", "full"
    rank: Optional[int]   # uniform rank (0 = head only)
    seed: int
    error: float
    budget: float         # adapter parameters (AdaLoRA: live at the end)
    table: Optional[str] = None   # the sweep table (sweep.json) the run belongs to, if any
    sweep_file: Optional[str] = None  # the sweep YAML that made it (sweep.json), if any
    sweep_overrides: tuple = ()       # the command-line overrides that sweep ran with


def load_runs(root: Path, split: str, weights: str = "any") -> tuple:
    """Stage-3 runs, stage-2 gap profiles per task, and notes on what was skipped.

    ``weights``: keep only runs whose body weights (the summaries' ``weights``) are these; ``any``
    keeps all. Why: gaps and knees of one analysis must come from one body.

    The pre-registered stage-2 runs (experiments ``prereg_*``) stay out of these gaps: they measure
    another primary metric, seven dial levels under one task name and aligned embedders, which averaged
    into a task's profile here would mix what :func:`prereg_inputs` keeps apart.
    """
    runs: List[Run] = []
    gaps: Dict[str, List[dict]] = defaultdict(list)
    notes: List[str] = []
    other_body: Dict[str, int] = defaultdict(int)
    for summary_path in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        d = summary_path.parent
        s = json.loads(summary_path.read_text())
        if s.get("status", "finished") != "finished":  # a run still running, or one that failed: no result
            continue
        if weights != "any" and s.get("stage") in ("stage2", "stage3") and s.get("weights") != weights:
            other_body[str(s.get("weights"))] += 1
            continue
        if s.get("stage") == "stage2" and str(s.get("experiment", "")).startswith(PREREG_EXPERIMENTS):
            continue
        if s.get("stage") == "stage2" and (d / "rank_map.json").is_file():
            rm = json.loads((d / "rank_map.json").read_text())
            prof = rm.get("gap_profile") or {}
            if prof.get("layers") and prof.get("D"):
                gaps[s["task"]].append({"metric": rm.get("gap_metric"), "layers": prof["layers"],
                                        "D": [float(v) for v in prof["D"]], "path": d})
            continue
        if s.get("stage") != "stage3":
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
        adapter = (cfg or {}).get("adapter", {}) or {}
        method = s.get("method")
        metric = s.get("metric")
        error = (s.get(split) or {}).get(metric)
        if error is None:
            notes.append(f"{d.relative_to(root)}: no {split} {metric}; skipped")
            continue
        budget = float((s.get("params") or {}).get("adapters", 0))
        rank = None
        if method == "head":
            variant, rank = "uniform", 0
        elif method == "lora" and not adapter.get("rank_map"):
            variant, rank = "uniform", int(adapter.get("rank", 0))
        elif method == "lora":
            variant = "adaptive"
        elif method == "adalora":
            variant, budget = "adalora", adalora_budget(d, s, adapter, notes, root)
        elif method == "full":
            variant = "full"
        else:
            notes.append(f"{d.relative_to(root)}: method {method!r} is not part of these analyses")
            continue
        sweep = json.loads((d / "sweep.json").read_text()) if (d / "sweep.json").is_file() else {}
        runs.append(Run(d, s["task"], variant, rank, int(s.get("seed", 0)), float(error), budget, sweep.get("table"),
                        sweep.get("sweep_file"), tuple(sweep.get("cli_overrides") or ())))
    for w, n in sorted(other_body.items()):
        notes.append(f"{n} run(s) with body weights {w!r} skipped (--weights {weights!r})")
    return runs, dict(gaps), notes


def select(runs: List[Run], tables: List[str], notes: List[str], what: str) -> List[Run]:
    """The runs of these sweep tables (``all``: every run), noting how many others were left out."""
    if tables == ["all"]:
        return runs
    kept = [r for r in runs if r.table in tables]
    if len(kept) < len(runs):
        notes.append(f"{what}: {len(runs) - len(kept)} stage-3 run(s) outside tables {', '.join(tables)} not used")
    return kept


def complete_sweeps(runs: List[Run], notes: List[str]) -> List[Run]:
    """The runs of sweeps whose every grid point has finished; a partial sweep's runs are left out.

    Why: a knee read from part of a grid is the best of the ranks that happened to run first (a sweep
    cut at a GPU deadline runs its low ranks first), not the task's knee. The grid comes from the sweep
    file named in the runs' ``sweep.json`` (relative to the repository, as ``orca.sweep`` records it);
    runs whose sweep file is not here are kept, with a note that their completeness was not checked.
    """
    kept: List[Run] = []
    by_table: Dict[Optional[str], List[Run]] = defaultdict(list)
    for r in runs:
        by_table[r.table].append(r)
    for table, members in by_table.items():
        files = {r.sweep_file for r in members if r.sweep_file}
        if table is None or not files:
            kept += members
            continue
        recorded = next((f for f in sorted(files) if (REPO / f).is_file()), None)
        if recorded is None:
            notes.append(f"{table}: sweep file {', '.join(sorted(files))} not found; completeness not checked")
            kept += members
            continue
        try:
            _, grid = load_sweep(REPO / recorded, next(r.sweep_overrides for r in members if r.sweep_file == recorded),
                                 Stage2Config)
        except ConfigError as err:
            notes.append(f"{table}: {recorded} does not load ({err}); completeness not checked")
            kept += members
            continue
        have = {r.path.name for r in members}
        missing = [g.name for g in grid if g.name not in have]
        if missing:
            notes.append(f"{table}: {len(grid) - len(missing)} of {len(grid)} runs of {recorded} "
                         f"finished (missing: {', '.join(missing)}); left out until the sweep is complete")
        else:
            kept += members
    return kept


def adalora_budget(d: Path, summary: dict, adapter: dict, notes: List[str], root: Path) -> float:
    """AdaLoRA's live adapter parameters in the weights it was tested with.

    From ``summary.json`` (stage 3's ``adapter_report``), else ``ckpt/last.pt``. Runs that recorded
    neither (made before stage 3 reported it; checkpoints stay out of git) get the count their
    schedule ends with at uniform cost per rank unit: peft prunes ``init_rank * n`` units to
    ``rank * n``, and the allocated count is ``init_rank`` units of every module, so the estimate is
    allocated * rank / init_rank. How AdaLoRA spread those units over wide and narrow modules is not
    known then, and the report says so.
    """
    report = (summary.get("adapter_report") or {}).get("final_budget")
    if report:
        return float(report["adapter_params"])
    ckpt = d / "ckpt" / "last.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True).get("method") or {}
        if "final_budget" in state:
            return float(state["final_budget"]["adapter_params"])
    allocated = float((summary.get("params") or {}).get("adapters", 0))
    rank = int(adapter.get("rank", 0))
    init_rank = int(adapter.get("adalora_init_rank") or math.ceil(1.5 * rank))
    estimate = allocated * rank / init_rank
    notes.append(f"{d.relative_to(root)}: no AdaLoRA final budget recorded (summary or ckpt/last.pt); "
                 f"{int(allocated):,} allocated at rank {init_rank} -> {int(round(estimate)):,} at its "
                 f"target rank {rank} (exact in rank units, not in how they spread over modules)")
    return estimate


def task_gaps(gaps: Dict[str, List[dict]]) -> tuple:
    """Per task: block -> D averaged over its stage-2 runs; the gap metric(s) in use."""
    out, metrics = {}, set()
    for task in sorted(gaps):
        profiles = gaps[task]
        layers = profiles[0]["layers"]
        same = [p for p in profiles if p["layers"] == layers]
        out[task] = {"layers": layers, "D": np.mean([p["D"] for p in same], axis=0), "n_runs": len(same)}
        metrics.update(p["metric"] for p in same)
    return out, sorted(m for m in metrics if m)


def prereg_inputs(root: Path, weights: str, primary: str) -> tuple:
    """Run records of the pre-registered sweeps and each task's primary gap, source-initialised and
    stage-1 aligned (rank_estimation.preregistered)."""
    records: List[dict] = []
    gaps: Dict[str, dict] = {}
    gaps_aligned: Dict[str, dict] = {}
    for summary_path in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        d = summary_path.parent
        s = json.loads(summary_path.read_text())
        if weights != "any" and s.get("weights") != weights:
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
        task = (cfg or {}).get("task") or {}
        key = task_key(task.get("name", s.get("task")), (task.get("options") or {}).get("level"))
        experiment = s.get("experiment")
        if s.get("stage") == "stage2" and experiment in (PREREG_GAPS, PREREG_GAPS_ALIGNED) and (d / "gaps.json").is_file():
            prof = json.loads((d / "gaps.json").read_text())
            blocks = [layer for layer in prof["layers"] if layer != "embed"]
            if primary in prof["metrics"]:
                (gaps if experiment == PREREG_GAPS else gaps_aligned)[key] = {f: float(np.mean([prof["values"][b][primary][f] for b in blocks]))
                             for f in ("value", "lo", "hi")}
            continue
        table = json.loads((d / "sweep.json").read_text()).get("table") if (d / "sweep.json").is_file() else None
        if s.get("stage") != "stage3" or not table or not table.startswith(PREREG_TABLES):
            continue
        error = (s.get("test") or {}).get(s.get("metric"))
        if error is None:
            continue
        adapter = (cfg or {}).get("adapter") or {}
        rec = {"key": key, "table": table, "seed": int(s.get("seed", 0)), "error": float(error), "rank": None}
        if s.get("method") == "head":
            rec["rank"] = 0
        elif adapter.get("rank_map"):
            arm, _, budget = Path(str(adapter["rank_map"])).stem.rpartition("_b")
            rec.update(arm=arm, budget=int(budget) if budget.isdigit() else None)
        elif s.get("method") == "lora":
            rec["rank"] = int(adapter.get("rank", 0))
        records.append(rec)
    return records, gaps, gaps_aligned
