"""Does the LoRA rank a task needs grow with its modality gap? Test it on the runs that exist.

    python scripts/hypothesis.py                                   # results/runs -> results/hypothesis.{md,json}
    python scripts/hypothesis.py --check                           # exit 1 if they are not what the runs give
    python scripts/hypothesis.py --runs runs --out results --tol 0.05 --split test
    python scripts/hypothesis.py --base-state body_init.pt         # (c): initial weights from a file

Reads every ``summary.json`` under ``--runs`` (stage-3 runs, grouped by task and by method / rank
through the ``config.yaml`` beside it; stage-2 runs through their ``rank_map.json``) and writes
``hypothesis.md`` plus three PNGs to ``--out``. Only runs of one body enter (``--weights``, default
the offline fractal body), and each analysis reads the sweeps made for it (``sweep.json``'s table):
(a)-(c) the knee sweeps with one recipe per task (``--knee-tables``: table3, ranks_patches,
ranks_heldout, ranks_digits, ranks_tones), (d) the equal-budget sweeps (``--budget-tables``: adaptive_darcy, adaptive_patches);
``--weights any --knee-tables all --budget-tables all`` pools everything.

(a) knee rank per task: the smallest uniform LoRA rank (0 = head only) whose seed-mean error is
    within ``--tol`` (relative) of the best rank's, with a bootstrap interval over seeds;
(b) across tasks, Spearman rho between the task's stage-2 gap (mean over blocks: primary; max,
    first, last block: secondary) and its knee, with a bootstrap CI and a permutation p-value;
(c) per full fine-tuning run, Spearman rho between each block's gap D_i and the effective rank of
    that block's update Delta W_i (energy rank at ``--energy``, stable rank), averaged over the
    block's Linears. From the Delta W spectra stage 3 writes (``delta_w.json.gz``, or a legacy
    ``delta_w.json``; no checkpoint needed) when present, else from ``ckpt/best.pt`` with W_0
    rebuilt from the run's config (the seed fixes random init) or given by ``--base-state``
    (which then takes precedence over the spectra); the report names the source of each run;
(d) stage-2 (adaptive) rank maps vs uniform ranks vs AdaLoRA at equal adapter budgets
    (``--budget-tol``); AdaLoRA's budget is its live rank units at the end (``ckpt/last.pt``).

The pre-registered test (results/preregistration.md) comes first: the runs of the sweep tables
``warmup_*`` (head-only warm-ups: rank 0), ``knee_*`` and ``placebo_*``, the stage-2 runs named
``prereg_gaps`` (each task's primary gap) and the primary metric chosen by
``results/calibration/gap_calibration.json``; ``rank_estimation.preregistered`` turns them into
``hypothesis.json`` and the report's first section, listing what is missing instead of estimating it.
``--check`` regenerates the report and the JSON in a temporary directory and exits 1 when either
differs from the committed files by one byte (the figures are redrawn, not compared). This file is
longer than most because it holds the whole report, pre-registered and exploratory, so that one
pass regenerates everything the report shows.

(a)-(d) below analyse the earlier sweeps, which predate the pre-registration (exploratory).
Every analysis ends in one line: held / failed / inconclusive (reason: ...), by the rule of
``rank_estimation.hypothesis.verdict``. Nothing is estimated for what is missing: the report says
which runs it would need. The output is a pure function of the runs (sorted inputs, fixed seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

from orca.errors import exit_on_error
from rank_estimation.hypothesis import (
    bootstrap_knee, budget_matched, combine_verdicts, delta_w_ranks, knee_order_verdict, mean_difference_ci,
    permutation_pvalue, spearman_with_ci, spectrum_ranks, verdict,
)
from rank_estimation.preregistered import analyse, render, task_key
from rank_estimation.spectra_file import find_spectra, read_spectra

GAP_SUMMARIES = {"mean": np.mean, "max": np.max, "first": lambda d: d[0], "last": lambda d: d[-1]}
#: The committed experiments: one body (the offline fractal Swin) and one recipe per analysis.
DEFAULT_WEIGHTS = "file:results/checkpoints/fractal_swin.safetensors"
KNEE_TABLES = ("table3", "ranks_patches", "ranks_heldout", "ranks_digits", "ranks_tones")  # (a)-(c): uniform ranks, head, full
BUDGET_TABLES = ("adaptive_darcy", "adaptive_patches")           # (d): uniform vs adaptive vs AdaLoRA
PREREG_TABLES = ("warmup_", "knee_", "placebo_", "aligned_")      # the pre-registered sweeps (table prefixes)
PREREG_GAPS = "prereg_gaps"                                       # experiment name of their stage-2 gap runs
PREREG_GAPS_ALIGNED = "prereg_gaps_aligned"                       # ... and of those with a stage-1 embedder
CALIBRATION = Path("results/calibration/gap_calibration.json")   # chooses the primary gap metric


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


# ----------------------------------------------------------------------------- loading
def load_runs(root: Path, split: str, weights: str = "any") -> tuple:
    """Stage-3 runs, stage-2 gap profiles per task, and notes on what was skipped.

    ``weights``: keep only runs whose body weights (the summaries' ``weights``) are these; ``any``
    keeps all. Why: gaps and knees of one analysis must come from one body.
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
    from orca.schema import ConfigError
    from orca.sweep import load_sweep

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
            _, grid = load_sweep(REPO / recorded, next(r.sweep_overrides for r in members if r.sweep_file == recorded))
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
        import torch

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


# ----------------------------------------------------------------------------- the analyses
def analysis_knees(runs: List[Run], a) -> Dict[str, dict]:
    knees = {}
    for task in sorted({r.task for r in runs}):
        by_rank: Dict[int, List[float]] = defaultdict(list)
        for r in sorted((r for r in runs if r.task == task and r.variant == "uniform"), key=lambda r: (r.rank, r.seed)):
            by_rank[r.rank].append(r.error)
        if len(by_rank) < 2:
            continue
        ranks = sorted(by_rank)
        res = bootstrap_knee(ranks, [by_rank[k] for k in ranks], a.tol, rel=True, n_boot=a.n_boot, seed=a.seed)
        means = [float(np.mean(by_rank[k])) for k in ranks]
        res.update(ranks=ranks, errors=[by_rank[k] for k in ranks], means=means,
                   best_rank=ranks[int(np.argmin(means))], best=min(means))
        knees[task] = res
    return knees


def verdict_knees(knees: dict, tg: dict) -> str:
    both = [t for t in knees if t in tg]
    if len(both) < 2:
        return f"inconclusive (reason: {len(both)} task(s) with both a rank sweep and a stage-2 gap, need 2)"
    by_gap = sorted(both, key=lambda t: float(np.mean(tg[t]["D"])))
    return knee_order_verdict(knees[by_gap[0]], knees[by_gap[-1]], (by_gap[0], by_gap[-1]))


def correlate(x, y, a) -> Dict[str, Any]:
    try:
        ci = spearman_with_ci(x, y, n_boot=a.n_boot, seed=a.seed)
        p = permutation_pvalue(x, y, n_perm=a.n_perm, seed=a.seed)
    except ValueError as err:
        return {"error": str(err), "verdict": f"inconclusive (reason: {err})"}
    return {**ci, "p": p, "verdict": verdict(ci["lo"], ci["hi"], p, a.alpha)}


def analysis_delta_w(runs: List[Run], tg: dict, a) -> List[dict]:
    out = []
    for run in [r for r in runs if r.variant == "full"]:
        ckpt = run.path / "ckpt" / "best.pt"
        spectra = find_spectra(run.path)
        if run.task not in tg:
            continue
        layers = tg[run.task]["layers"]
        # --base-state names the W_0 to compare with, so it needs the checkpoint; else the spectra
        # stage 3 wrote (no checkpoint needed), else the checkpoint with W_0 rebuilt.
        if spectra is not None and not (a.base_state and ckpt.is_file()):
            names, ranks, w0_fro, how = ranks_from_spectra(spectra, layers, a.energy)
            source = spectra.name
        elif ckpt.is_file():
            names, ranks, w0_fro, how = ranks_from_checkpoint(run.path, ckpt, layers, a)
            source = "ckpt/best.pt"
        else:
            continue
        per_block = {b: [v for k, v in ranks.items() if k.startswith(f"body.{b}.")] for b in layers}
        keep = [b for b in layers if per_block[b]]
        D = [float(tg[run.task]["D"][layers.index(b)]) for b in keep]
        energy = [float(np.mean([v["energy_rank"] for v in per_block[b]])) for b in keep]
        stable = [float(np.mean([v["stable_rank"] for v in per_block[b]])) for b in keep]
        # Width control: later blocks are wider, so they admit larger ranks whatever their gap;
        # the energy rank as a fraction of min(d_out, d_in) takes the width out.
        frac = [float(np.mean([v["energy_rank"] / v["max_rank"] for v in per_block[b]])) for b in keep]
        # A W_0 that is not the run's starting point (a different random init) shows as updates as
        # large as the weights themselves; fine-tuning moves weights by a small fraction.
        rel = float(np.median([ranks[f"body.{n}"]["fro"] / max(w0_fro[n], 1e-12) for n in names]))
        out.append({"run": run, "how": how, "source": source, "blocks": keep, "D": D, "energy": energy,
                    "stable": stable, "energy_frac": frac, "rel_update": rel,
                    "energy_corr": correlate(D, energy, a), "stable_corr": correlate(D, stable, a),
                    "frac_corr": correlate(D, frac, a)})
    return out


def ranks_from_checkpoint(run_dir: Path, ckpt: Path, layers: List[str], a) -> tuple:
    """(c) from ``ckpt/best.pt`` and W_0 (``--base-state`` or rebuilt): names, ranks, ||W_0||_F, how."""
    import torch

    tuned = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    base, how = initial_state(run_dir, a.base_state)
    names = sorted({k[len("body."):-len(".weight")] for k, v in tuned.items()
                    if k.startswith("body.") and k.endswith(".weight") and v.ndim == 2
                    and any(k.startswith(f"body.{b}.") for b in layers)})
    ranks = delta_w_ranks({f"body.{n}.weight": base[f"body.{n}.weight"] for n in names},
                          {f"body.{n}.weight": tuned[f"body.{n}.weight"] for n in names},
                          [f"body.{n}" for n in names], energy=a.energy)
    w0_fro = {n: float(np.linalg.norm(base[f"body.{n}.weight"].double().numpy())) for n in names}
    return names, ranks, w0_fro, how


def ranks_from_spectra(path: Path, layers: List[str], energy: float) -> tuple:
    """(c) from the Delta W spectra stage 3 wrote (``delta_w.json.gz``): names, ranks, ||W_0||_F, how."""
    try:
        spectra = read_spectra(path)["layers"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: no Delta W spectra in it ({err}); delete it to fall back to ckpt/best.pt") from err
    names = sorted(n[len("body."):] for n in spectra
                   if n.startswith("body.") and any(n.startswith(f"body.{b}.") for b in layers))
    ranks = {f"body.{n}": spectrum_ranks(spectra[f"body.{n}"]["s"], energy) for n in names}
    w0_fro = {n: float(spectra[f"body.{n}"]["w0_fro"]) for n in names}
    return names, ranks, w0_fro, (f"spectra from `{path.name}`: stage 3's best checkpoint vs the model "
                                  "it built at its start, no checkpoint read")


def initial_state(run_dir: Path, base_state: Optional[str]) -> tuple:
    """W_0: a given state dict, or the model rebuilt exactly as stage 3 built it
    (``orca.train.initial_model``: seed, task, model)."""
    import torch

    if base_state:
        state = torch.load(base_state, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return ({k if k.startswith("body.") else f"body.{k}": v for k, v in state.items()}, f"--base-state {base_state}")
    from orca.config import load_config
    from orca.train import initial_model

    _, model = initial_model(load_config(str(run_dir / "config.yaml")))
    return model.state_dict(), "rebuilt from the run's config.yaml (same seed)"


def analysis_budgets(runs: List[Run], a) -> tuple:
    rows = [{"task": r.task, "variant": f"uniform r={r.rank}" if r.variant == "uniform" else r.variant,
             "budget": r.budget, "error": r.error}
            for r in runs if r.variant in ("uniform", "adaptive", "adalora") and r.budget > 0]
    buckets = budget_matched(rows, rel_tol=a.budget_tol)
    verdicts, reasons = [], []
    for b in buckets:
        v = b["variants"]
        uniform = [k for k in v if k.startswith("uniform")]
        if "adaptive" not in v or not uniform:
            continue
        best_u = min(uniform, key=lambda k: v[k]["mean"])
        d = mean_difference_ci(v[best_u]["errors"], v["adaptive"]["errors"], n_boot=a.n_boot, seed=a.seed)
        b["uniform_minus_adaptive"] = {**d, "uniform": best_u}
        if "adalora" in v:
            b["adalora_minus_adaptive"] = mean_difference_ci(v["adalora"]["errors"], v["adaptive"]["errors"],
                                                              n_boot=a.n_boot, seed=a.seed)
        if not d["spread"]:
            reasons.append("1 seed per variant")
        verdicts.append(verdict(d["lo"], d["hi"]))
    if not verdicts:
        return buckets, "inconclusive (reason: no budget bucket holds both an adaptive and a uniform run)"
    if reasons:
        return buckets, verdict(0, 0, extra_reasons=sorted(set(reasons)))
    return buckets, combine_verdicts(verdicts)


# ----------------------------------------------------------------------------- plots
def plots(out: Path, knees: dict, tg: dict, dw: List[dict]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    meta = {"Software": None}  # no version string: the file depends on the data alone
    if knees:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, k in knees.items():
            sd = [float(np.std(e, ddof=1)) if len(e) > 1 else 0.0 for e in k["errors"]]
            ax.errorbar(k["ranks"], k["means"], yerr=sd, marker="o", capsize=3, label=f"{task} (knee {k['knee']})")
            ax.axvline(k["knee"], ls=":", color=ax.lines[-1].get_color())
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set(xlabel="uniform LoRA rank (0 = head only)", ylabel="error (mean +- sd over seeds)",
               title="rank vs error per task")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "hypothesis_rank_vs_error.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_rank_vs_error.png")
    both = [t for t in knees if t in tg]
    if both:
        fig, ax = plt.subplots(figsize=(5, 4))
        x = [float(np.mean(tg[t]["D"])) for t in both]
        y = [knees[t]["knee"] for t in both]
        err = [[k - knees[t]["lo"] for t, k in zip(both, y)], [knees[t]["hi"] - k for t, k in zip(both, y)]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
        for t, xi, yi in zip(both, x, y):
            ax.annotate(t, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="task gap (mean over blocks)", ylabel="knee rank", title="gap vs knee rank")
        fig.tight_layout()
        fig.savefig(out / "hypothesis_gap_vs_knee.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_gap_vs_knee.png")
    if dw:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for item in dw:
            label = f"{item['run'].task} s{item['run'].seed}"
            axes[0].scatter(item["D"], item["energy"], label=label)
            axes[1].scatter(item["D"], item["stable"], label=label)
        axes[0].set(xlabel="block gap D_i", ylabel="energy rank of Delta W (mean over Linears)")
        axes[1].set(xlabel="block gap D_i", ylabel="stable rank of Delta W (mean over Linears)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "hypothesis_gap_vs_delta_w.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_gap_vs_delta_w.png")
    return made


# ----------------------------------------------------------------------------- the pre-registered test
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


def prereg_plots(out: Path, result: dict) -> List[str]:
    """Gap vs dial level, knee vs gap, error vs rank per task: each only from data that exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, made = {"Software": None}, []
    tol = f"{result['primary_tolerance']:g}"
    dial = [t for t in result["tasks"] if t["level"] is not None and t["gap"]]
    if dial:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([t["level"] for t in dial], [t["gap"]["value"] for t in dial], capsize=3, marker="o",
                    yerr=[[t["gap"]["value"] - t["gap"]["lo"] for t in dial], [t["gap"]["hi"] - t["gap"]["value"] for t in dial]])
        ax.set(xlabel="dial level", ylabel=f"{result['primary_metric']} (mean over blocks)", title="gap vs dial level")
        fig.tight_layout()
        fig.savefig(out / "hypothesis_dial_gap.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_dial_gap.png")
    both = [t for t in result["tasks"] if t["gap"] and t["knees"] and t["complete"]]
    if both:
        fig, ax = plt.subplots(figsize=(5, 4))
        x = [t["gap"]["value"] for t in both]
        y = [t["knees"][tol]["knee"] for t in both]
        ax.errorbar(x, y, fmt="o", capsize=3, xerr=[[v - t["gap"]["lo"] for v, t in zip(x, both)],
                                                     [t["gap"]["hi"] - v for v, t in zip(x, both)]],
                    yerr=[[k - t["knees"][tol]["lo"] for k, t in zip(y, both)], [t["knees"][tol]["hi"] - k for k, t in zip(y, both)]])
        for t, xi, yi in zip(both, x, y):
            ax.annotate(t["key"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_yscale("symlog", base=2, linthresh=1)
        ax.set(xlabel=f"gap ({result['primary_metric']})", ylabel=f"knee rank (tolerance {tol})", title="knee vs gap")
        fig.tight_layout()
        fig.savefig(out / "hypothesis_knee_vs_gap.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_knee_vs_gap.png")
    curves = [t for t in result["tasks"] if t["errors"]]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in curves:
            ranks = [int(k) for k in t["errors"]]
            errs = list(t["errors"].values())
            ax.errorbar(ranks, [float(np.mean(e)) for e in errs], marker="o", capsize=3, label=t["key"],
                        yerr=[float(np.std(e, ddof=1)) if len(e) > 1 else 0.0 for e in errs])
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set(xlabel="LoRA rank (0 = the frozen warm-up)", ylabel="test error (mean +- sd over seeds)",
               title="error vs rank per task")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "hypothesis_error_vs_rank.png", dpi=110, metadata=meta)
        plt.close(fig)
        made.append("hypothesis_error_vs_rank.png")
    return made


# ----------------------------------------------------------------------------- the report
def fmt_corr(c: dict) -> str:
    if "error" in c:
        return f"not computed ({c['error']})"
    return f"rho = {c['rho']:.3f}, {int(c['level'] * 100)}% CI [{c['lo']:.3f}, {c['hi']:.3f}], permutation p = {c['p']:.3g}, n = {c['n']}"


def report(a, runs, tg, metrics, notes, knees, dw, buckets, d_verdict, pngs) -> str:
    L = ["# Rank-gap hypothesis", "",
         "Hypothesis (seed 001): the LoRA rank a task needs grows with its modality gap.", "",
         f"Inputs: {len(runs)} stage-3 runs and stage-2 gaps for {len(tg)} task(s) under `{a.runs}` "
         f"(body weights: {a.weights}; (a)-(c) from tables {', '.join(a.knee_tables)}; (d) from tables "
         f"{', '.join(a.budget_tables)}); "
         f"errors on the {a.split} split; knee tolerance {a.tol:g} (relative); {a.n_boot} bootstrap "
         f"replicates, {a.n_perm} permutations, seed {a.seed}, alpha {a.alpha:g}.", ""]
    if not runs:
        L += ["**No stage-3 runs were found**, so nothing below is estimated. Needed:", "",
              "- (a), (b): per task, a uniform-rank sweep (`adapter.method=lora adapter.rank=R`, several R, "
              ">= 2 seeds each; `adapter.method=head` for rank 0) and a stage-2 run (`rank_map.json`) on >= 3 tasks;",
              "- (c): a full fine-tuning run (`adapter.method=full`, writes `delta_w.json.gz`) per task;",
              "- (d): stage-3 runs with `adapter.rank_map=<stage-2 rank_map.json>` and `adapter.method=adalora` "
              "at the budget of a uniform rank.", ""]
    if metrics and len(metrics) > 1:
        L += [f"Warning: the stage-2 runs use different gap metrics {metrics}; gaps are not comparable across tasks.", ""]
    # (a)
    L += ["## (a) Knee rank per task", ""]
    if knees:
        L += ["| task | knee | CI | best rank | best error | ranks | seeds per rank |", "|---|---|---|---|---|---|---|"]
        for t, k in knees.items():
            L.append(f"| {t} | {k['knee']} | [{k['lo']}, {k['hi']}] ({int(k['level'] * 100)}%) | {k['best_rank']} | "
                     f"{k['best']:.4g} | {', '.join(map(str, k['ranks']))} | {', '.join(map(str, k['n_seeds']))} |")
        L.append("")
    else:
        L += ["Missing: no task has uniform-rank runs at >= 2 ranks.", ""]
    L += [f"Verdict (a), larger-gap task has a larger knee: **{verdict_knees(knees, tg)}**", ""]
    # (b)
    L += ["## (b) Task gap vs knee rank across tasks", ""]
    both = [t for t in knees if t in tg]
    if both:
        L += ["| task | mean gap | max gap | first block | last block | knee |", "|---|---|---|---|---|---|"]
        for t in both:
            D = np.asarray(tg[t]["D"])
            L.append(f"| {t} | " + " | ".join(f"{float(f(D)):.4g}" for f in GAP_SUMMARIES.values()) + f" | {knees[t]['knee']} |")
        L.append("")
    primary = "inconclusive (reason: n tasks = %d < 3)" % len(both)
    if len(both) >= 3 and 2 / math.factorial(len(both)) >= a.alpha:
        # a perfect rank order is 2 of the n! orderings: below alpha only from 5 tasks on (2/120)
        L += [f"With {len(both)} tasks the smallest two-sided permutation p is 2/{len(both)}! = "
              f"{2 / math.factorial(len(both)):.3g} >= alpha = {a.alpha:g}: (b) cannot be significant until "
              "5 tasks have both a rank sweep and a gap profile (the CI is still informative).", ""]
    if len(both) >= 3:
        for name, f in GAP_SUMMARIES.items():
            c = correlate([float(f(np.asarray(tg[t]["D"]))) for t in both], [knees[t]["knee"] for t in both], a)
            tag = "primary" if name == "mean" else "secondary"
            L.append(f"- {name} gap ({tag}): {fmt_corr(c)}")
            if name == "mean":
                primary = c["verdict"] if not (metrics and len(metrics) > 1) else \
                    "inconclusive (reason: gap metrics differ across tasks)"
        try:
            from rank_estimation.allocate import fit_gamma

            fit = fit_gamma({t: (float(np.mean(tg[t]["D"])), knees[t]["knee"]) for t in both})
            L.append(f"- power law log D = log beta + gamma log(1 + r): gamma = {fit.gamma:.3f} +- {fit.gamma_se:.3f} (n = {fit.n})")
        except ValueError as err:
            L.append(f"- power law fit not possible: {err}")
        L.append("")
    L += [f"Verdict (b), gap rank-correlates with knee (mean gap): **{primary}**", ""]
    # (c)
    L += ["## (c) Per-layer gap vs rank of the full fine-tuning update", ""]
    c_verdicts = []
    for item in dw:
        r = item["run"]
        warn = (" **Warning: the median ||Delta W|| / ||W_0|| is > 0.5; W_0 is probably not this run's starting "
                "point (pass --base-state).**" if item["rel_update"] > 0.5 else "")
        # The checkpoint path's line is unchanged: its "W_0 rebuilt ..." / "W_0 --base-state ..." names it.
        how = f"Delta W {item['how']}" if item["source"] != "ckpt/best.pt" else f"W_0 {item['how']}"
        L += [f"- {r.task} seed {r.seed} (`{r.path.relative_to(a.runs)}`, {how}), {len(item['blocks'])} blocks, "
              f"median ||Delta W||_F / ||W_0||_F = {item['rel_update']:.3g}.{warn}",
              f"  - energy rank ({a.energy:g}): {fmt_corr(item['energy_corr'])} -> {item['energy_corr']['verdict']}",
              f"  - stable rank: {fmt_corr(item['stable_corr'])} -> {item['stable_corr']['verdict']}",
              f"  - width control, energy rank / min(d_out, d_in): {fmt_corr(item['frac_corr'])} -> "
              f"{item['frac_corr']['verdict']}"]
        c_verdicts.append(item["energy_corr"]["verdict"])
    if not dw:
        L.append("Missing: no full fine-tuning run (`adapter.method=full` with `delta_w.json.gz` or `ckpt/best.pt`) "
                 "of a task that has stage-2 gaps.")
    c_final = combine_verdicts(c_verdicts) if c_verdicts else "inconclusive (reason: no full fine-tuning run with gaps)"
    L += ["", f"Verdict (c), D_i rank-correlates with the energy rank of Delta W_i: **{c_final}**"]
    if dw:
        L.append("(The verdict is read from the energy rank, as declared before the runs; the width control "
                 "is reported beside it because wider blocks admit larger ranks whatever their gap.)")
    L.append("")
    # (d)
    L += ["## (d) Adaptive rank maps vs uniform ranks vs AdaLoRA at equal budgets", ""]
    if buckets:
        L += ["| task | adapter params | variant | error mean | sd | n |", "|---|---|---|---|---|---|"]
        for b in buckets:
            for name, v in b["variants"].items():
                L.append(f"| {b['task']} | {int(b['budget_lo']):,}-{int(b['budget_hi']):,} | {name} | {v['mean']:.4g} | {v['sd']:.2g} | {v['n']} |")
        L.append("")
        for b in buckets:
            for key, what in (("uniform_minus_adaptive", "best uniform"), ("adalora_minus_adaptive", "AdaLoRA")):
                if key in b:
                    d = b[key]
                    L.append(f"- {b['task']} @ {int(b['budget_lo']):,}: {what} - adaptive error = {d['diff']:.4g} "
                             f"(95% CI [{d['lo']:.4g}, {d['hi']:.4g}]; > 0 favours adaptive)")
        L.append("")
    else:
        L += ["Missing: no adaptive, uniform or AdaLoRA runs with adapter parameters.", ""]
    L += [f"Verdict (d), adaptive maps beat the best uniform rank at equal budget: **{d_verdict}**", ""]
    L += ["## Overall", "", f"The hypothesis (gap predicts the needed rank, test (b)): **{primary}**.", ""]
    if pngs:
        L += ["## Figures", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


def main(argv: Optional[List[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("results/runs"), help="root searched for run directories")
    p.add_argument("--out", type=Path, default=Path("results"), help="where hypothesis.md and the PNGs go")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which error the knees are read from")
    p.add_argument("--tol", type=float, default=0.05, help="knee: error within (1 + tol) x the best rank's")
    p.add_argument("--energy", type=float, default=0.9, help="(c) energy fraction of the effective rank")
    p.add_argument("--budget-tol", type=float, default=0.1, help="(d) relative width of an equal-budget bucket")
    p.add_argument("--base-state", default=None, help="(c) state dict of the initial model (default: rebuild)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--n-perm", type=int, default=10000)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="use only runs whose body weights are these (summary.json 'weights'); 'any' = all")
    p.add_argument("--knee-tables", nargs="+", default=list(KNEE_TABLES),
                   help="(a)-(c) read uniform, head and full runs of these sweep tables (one recipe per task); 'all' = every run")
    p.add_argument("--budget-tables", nargs="+", default=list(BUDGET_TABLES),
                   help="(d) reads the runs of these sweep tables; 'all' = every run")
    p.add_argument("--calibration", type=Path, default=CALIBRATION,
                   help="the gap calibration whose selected primary metric the pre-registered test uses")
    p.add_argument("--check", action="store_true",
                   help="regenerate into a temporary directory and exit 1 if hypothesis.md or .json differ from --out's")
    a = p.parse_args(argv)
    if not 0 <= a.tol < 1 or not 0 < a.energy <= 1 or a.budget_tol < 0 or a.n_boot < 1 or a.n_perm < 1:
        p.error("need 0 <= --tol < 1, 0 < --energy <= 1, --budget-tol >= 0, --n-boot >= 1, --n-perm >= 1")
    if a.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = main(_without_check(argv) + ["--out", tmp])
            differ = [name for name in ("hypothesis.md", "hypothesis.json")
                      if not (a.out / name).is_file() or (a.out / name).read_bytes() != (fresh.parent / name).read_bytes()]
        if differ:
            print(f"[hypothesis] out of date: {', '.join(str(a.out / n) for n in differ)} differ from what the runs "
                  f"give; rerun without --check and commit", file=sys.stderr)
            sys.exit(1)
        print(f"[hypothesis] {a.out}/hypothesis.md and hypothesis.json are up to date")
        return a.out / "hypothesis.md"
    if not a.calibration.is_file():
        p.error(f"--calibration {a.calibration}: no such file; run scripts/calibrate_gaps.py first")
    primary = json.loads(a.calibration.read_text())["selection"]["primary"]
    records, prereg_gaps, prereg_gaps_aligned = prereg_inputs(a.runs, a.weights, primary)
    prereg = analyse(records, prereg_gaps, primary, n_boot=a.n_boot, n_perm=a.n_perm, seed=a.seed,
                     gaps_aligned=prereg_gaps_aligned)
    runs, gaps, notes = load_runs(a.runs, a.split, a.weights)
    tg, metrics = task_gaps(gaps)
    knee_runs = complete_sweeps(select(runs, a.knee_tables, notes, "(a)-(c)"), notes)
    knees = analysis_knees(knee_runs, a)
    dw = analysis_delta_w(knee_runs, tg, a)
    buckets, d_verdict = analysis_budgets(select(runs, a.budget_tables, notes, "(d)"), a)
    a.out.mkdir(parents=True, exist_ok=True)
    pngs = plots(a.out, knees, tg, dw)
    prereg_pngs = prereg_plots(a.out, prereg)
    title = "# Rank-gap hypothesis\n\n"
    section = render(prereg) + "".join(f"![{p}]({p})\n" for p in prereg_pngs)
    earlier = report(a, runs, tg, metrics, notes, knees, dw, buckets, d_verdict, pngs)
    path = a.out / "hypothesis.md"
    path.write_text(title + section + "\n## Earlier sweeps (exploratory: they predate the pre-registration)\n\n"
                    + earlier[len(title):])
    payload = {"calibration": str(a.calibration), "runs": str(a.runs), "weights": a.weights, "split": a.split,
               "seed": a.seed, "n_boot": a.n_boot, "n_perm": a.n_perm, **prereg}
    (a.out / "hypothesis.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"[hypothesis] wrote {path} and hypothesis.json ({', '.join(pngs + prereg_pngs) or 'no figures'})")
    return path


def _without_check(argv: Optional[List[str]]) -> List[str]:
    """The command line minus ``--check`` and any ``--out`` (the check writes to a temporary directory)."""
    args = list(argv if argv is not None else sys.argv[1:])
    out: List[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--check":
            continue
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
