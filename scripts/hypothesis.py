"""Does the LoRA rank a task needs grow with its modality gap? Test it on the runs that exist.

    bash scripts/hypothesis.sh                                     # results/runs -> results/hypothesis.{md,json}
    bash scripts/hypothesis.sh --check                             # exit 1 if they are not what the runs give
    bash scripts/hypothesis.sh --runs runs --out results --tol 0.05 --split test
    bash scripts/hypothesis.sh --base-state body_init.pt           # (c): initial weights from a file

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
differs from the committed files by one byte (the figures are redrawn, not compared). The runs are read by
``rank_estimation.evidence`` and the figures drawn by ``rank_estimation.hypothesis_figures``.

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
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from orca.cli import CONFIG_SCHEMA
from orca.config import load_config
from orca.errors import exit_on_error
from orca.spectra import delta_w_ranks, find_spectra, read_spectra, spectrum_ranks
from orca.train import initial_model
from rank_estimation.allocate import fit_gamma
from rank_estimation.hypothesis import (
    bootstrap_knee, budget_matched, combine_verdicts, knee_order_verdict, mean_difference_ci,
    permutation_pvalue, spearman_with_ci, verdict,
)
from rank_estimation.evidence import Run, complete_sweeps, load_runs, prereg_inputs, select, task_gaps
from rank_estimation.hypothesis_figures import plots, prereg_plots
from rank_estimation.plateau import load_verdicts
from rank_estimation.preregistered import analyse, render

GAP_SUMMARIES = {"mean": np.mean, "max": np.max, "first": lambda d: d[0], "last": lambda d: d[-1]}
#: The committed experiments: one body (the offline fractal Swin) and one recipe per analysis.
DEFAULT_WEIGHTS = "file:results/checkpoints/fractal_swin.safetensors"
KNEE_TABLES = ("table3", "ranks_patches", "ranks_heldout", "ranks_digits", "ranks_tones")  # (a)-(c): uniform ranks, head, full
BUDGET_TABLES = ("adaptive_darcy", "adaptive_patches")           # (d): uniform vs adaptive vs AdaLoRA
CALIBRATION = Path("results/calibration/gap_calibration.json")   # chooses the primary gap metric


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
    if base_state:
        state = torch.load(base_state, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return ({k if k.startswith("body.") else f"body.{k}": v for k, v in state.items()}, f"--base-state {base_state}")
    _, model = initial_model(load_config(str(run_dir / "config.yaml"), schema=CONFIG_SCHEMA))
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


# ----------------------------------------------------------------------------- the report
def table(header: List[str], rows: List[List[Any]]) -> List[str]:
    """A markdown table's lines: the header, its rule, one line per row, then a blank line."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""])


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
        L += table(["task", "knee", "CI", "best rank", "best error", "ranks", "seeds per rank"],
                   [[t, k["knee"], f"[{k['lo']}, {k['hi']}] ({int(k['level'] * 100)}%)", k["best_rank"], f"{k['best']:.4g}",
                     ", ".join(map(str, k["ranks"])), ", ".join(map(str, k["n_seeds"]))] for t, k in knees.items()])
    else:
        L += ["Missing: no task has uniform-rank runs at >= 2 ranks.", ""]
    L += [f"Verdict (a), larger-gap task has a larger knee: **{verdict_knees(knees, tg)}**", ""]
    # (b)
    L += ["## (b) Task gap vs knee rank across tasks", ""]
    both = [t for t in knees if t in tg]
    if both:
        L += table(["task", "mean gap", "max gap", "first block", "last block", "knee"],
                   [[t, *(f"{float(f(np.asarray(tg[t]['D']))):.4g}" for f in GAP_SUMMARIES.values()), knees[t]["knee"]]
                    for t in both])
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
        L += table(["task", "adapter params", "variant", "error mean", "sd", "n"],
                   [[b["task"], f"{int(b['budget_lo']):,}-{int(b['budget_hi']):,}", name, f"{v['mean']:.4g}", f"{v['sd']:.2g}",
                     v["n"]] for b in buckets for name, v in b["variants"].items()])
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
    p.add_argument("--pilots", type=Path, default=Path("results/pilots"),
                   help="the plateau pilots' verdicts (scripts/plateau_pilot.py --out), reported with the recipe")
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
                     gaps_aligned=prereg_gaps_aligned, pilots=load_verdicts(a.pilots))
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
