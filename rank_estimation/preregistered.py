"""The pre-registered analysis of results/preregistration.md, as pure functions from run records to a report.

Input: one record per finished stage-3 run of the pre-registered sweeps (``key`` = ``dial0`` ..
``dial6`` or a task name, ``table`` (``warmup_*``: the head-only warm-ups, rank 0; ``knee_*``: the
adapter runs; ``placebo_*``), ``rank`` or placebo ``arm`` and ``budget``, ``seed``, test ``error``) and each task's primary gap (stage 2's per-block primary metric, averaged over blocks;
its interval is the mean of the per-block bounds: exact when the block estimates move together,
wider otherwise). Output: :func:`analyse` builds the machine-readable ``hypothesis.json`` payload and
:func:`render` the Markdown section from that payload alone, so the two can never disagree and a
regeneration can be compared byte for byte.

What is estimated, each only from complete data (every rank of :data:`KNEE_RANKS` with at least
:data:`MIN_SEEDS` seeds), and otherwise listed under ``missing``:

- knees at :data:`TOLERANCES` with 90% intervals from a bootstrap over seeds within each rank;
- Spearman(gap, knee at :data:`PRIMARY_TOLERANCE`) over all tasks with an exact permutation p;
- gamma's posterior in log D = log beta + gamma log(1 + knee) (:mod:`rank_estimation.gamma_posterior`),
  averaged over bootstrap draws of knees and gaps; tasks whose gap interval contains 0 stay out of
  this fit (log D is undefined there) and in the correlation;
- the dial's gaps level by level: whether the primary gap rises strictly from each level to the
  next and whether adjacent levels' intervals are apart (the calibration's criterion, section 1,
  read off the pre-registered profiles);
- the equal-budget table: the stage-2 map against its uniform, shuffled-gap and depth-only placebos;
- the stage-1 arm (tables ``aligned_*``, gaps of ``prereg_gaps_aligned``): on :data:`STAGE1_KEYS`, the
  gap and the knee with the stage-1 aligned embedder beside the source-initialised one, and the knee
  difference with a 90% interval from independent seed bootstraps of the two curves. Reported beside
  the verdict, never part of it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from rank_estimation.gamma_posterior import gamma_posterior
from rank_estimation.hypothesis import (_curve, _knee_from_means, bootstrap_knee, mean_difference_ci,
                                        permutation_pvalue, spearman_with_ci)

TOLERANCES = (0.01, 0.02, 0.05, 0.10)
PRIMARY_TOLERANCE = 0.05
KNEE_RANKS = (0, 1, 2, 4, 8, 16, 32, 64)
MIN_SEEDS = 3
DIAL_KEYS = tuple(f"dial{level}" for level in range(7))
TASK_KEYS = DIAL_KEYS + ("darcy", "tones", "digits", "natural_patches", "fractal_heldout")
PLACEBO_ARMS = ("stage2", "uniform", "shuffled", "depth")
PLACEBO_KEYS = ("darcy", "dial3")
STAGE1_KEYS = ("darcy", "dial2", "dial5")
STAGE1_TABLE_PREFIX = "aligned_"
KNEE_LEVEL = 0.9


def task_key(task: str, level: Optional[int]) -> str:
    """``dial{level}`` for the gap dial, else the task name."""
    return f"dial{level}" if task == "fractal_dial" else task


def knee_replicates(ranks: Sequence[int], errors_by_seed: Sequence[Sequence[float]], tol: float, n_boot: int,
                    seed: int) -> np.ndarray:
    """Knees of ``n_boot`` replicates that resample each rank's seeds with replacement (as :func:`bootstrap_knee`)."""
    r, errs = _curve(ranks, errors_by_seed)
    rng = np.random.default_rng(seed)
    return np.array([_knee_from_means(r, np.array([e[rng.integers(0, len(e), len(e))].mean() for e in errs]),
                                      float(tol), True) for _ in range(n_boot)])


def _knee_curves(runs: Sequence[Mapping[str, Any]], prefixes: tuple = ("knee_", "warmup_")
                 ) -> Dict[str, Dict[int, List[float]]]:
    curves: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    knee_runs = [r for r in runs if str(r.get("table", "")).startswith(prefixes) and r.get("rank") is not None]
    for r in sorted(knee_runs, key=lambda r: (r["key"], r["rank"], r["seed"])):
        curves[r["key"]][int(r["rank"])].append(float(r["error"]))
    return curves


def _knee(ranks: Sequence[int], errs: Sequence[Sequence[float]], tol: float, n_boot: int, seed: int) -> Dict[str, Any]:
    """The knee at ``tol`` with its seed-bootstrap interval (:data:`KNEE_LEVEL`)."""
    out = bootstrap_knee(ranks, errs, tol, True, n_boot, seed, KNEE_LEVEL)
    return {k: out[k] for k in ("knee", "lo", "hi")}


def _complete(curve: Mapping[int, List[float]]) -> List[str]:
    gaps = [f"rank {k}: {len(curve.get(k, []))} of {MIN_SEEDS} seeds" for k in KNEE_RANKS
            if len(curve.get(k, [])) < MIN_SEEDS]
    return gaps


def _stage1(runs: Sequence[Mapping[str, Any]], source_curves: Mapping[str, Mapping[int, List[float]]],
            gaps: Mapping[str, Mapping[str, float]], gaps_aligned: Mapping[str, Mapping[str, float]], n_boot: int,
            seed: int) -> Dict[str, Any]:
    aligned = _knee_curves(runs, prefixes=(STAGE1_TABLE_PREFIX,))
    rows, missing = [], []
    for key in STAGE1_KEYS:
        row: Dict[str, Any] = {"key": key, "gap_source": dict(gaps[key]) if key in gaps else None,
                               "gap_aligned": dict(gaps_aligned[key]) if key in gaps_aligned else None}
        reps = {}
        for arm, curve in (("source", source_curves.get(key, {})), ("aligned", aligned.get(key, {}))):
            row[f"seeds_per_rank_{arm}"] = {str(k): len(curve.get(k, [])) for k in KNEE_RANKS}
            row[f"knee_{arm}"] = None
            if _complete(curve):
                missing.append(f"stage-1 comparison on {key}: the {arm} knee sweep is incomplete")
                continue
            ranks = sorted(curve)
            errs = [curve[k] for k in ranks]
            row[f"knee_{arm}"] = _knee(ranks, errs, PRIMARY_TOLERANCE, n_boot, seed)
            reps[arm] = knee_replicates(ranks, errs, PRIMARY_TOLERANCE, n_boot, seed + (arm == "aligned"))
        if row["gap_aligned"] is None:
            missing.append(f"stage-1 comparison on {key}: no gap profile with the aligned embedder")
        row["knee_aligned_minus_source"] = None
        if len(reps) == 2:
            d = reps["aligned"] - reps["source"]
            half = (1 - KNEE_LEVEL) / 2
            row["knee_aligned_minus_source"] = {
                "diff": row["knee_aligned"]["knee"] - row["knee_source"]["knee"],
                "lo": float(np.quantile(d, half)), "hi": float(np.quantile(d, 1 - half))}
        rows.append(row)
    return {"tolerance": PRIMARY_TOLERANCE, "rows": rows, "missing": missing}


def _placebo(runs: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> Dict[str, Any]:
    cells: Dict[tuple, List[float]] = defaultdict(list)
    for r in runs:
        if str(r.get("table", "")).startswith("placebo_") and r.get("arm") in PLACEBO_ARMS:
            cells[(r["key"], int(r["budget"]), r["arm"])].append(float(r["error"]))
    rows, diffs = [], []
    for key, budget in sorted({(k, b) for k, b, _ in cells}):
        for arm in PLACEBO_ARMS:
            e = cells.get((key, budget, arm), [])
            rows.append({"key": key, "budget": budget, "arm": arm, "n": len(e),
                         "mean": float(np.mean(e)) if e else None,
                         "sd": float(np.std(e, ddof=1)) if len(e) > 1 else None})
        s2 = cells.get((key, budget, "stage2"), [])
        for arm in PLACEBO_ARMS[1:]:
            other = cells.get((key, budget, arm), [])
            if s2 and other:
                d = mean_difference_ci(other, s2, n_boot=n_boot, seed=seed)
                diffs.append({"key": key, "budget": budget, "placebo": arm, "placebo_minus_stage2": d["diff"],
                              "lo": d["lo"], "hi": d["hi"]})
    return {"rows": rows, "differences": diffs}


def analyse(runs: Sequence[Mapping[str, Any]], gaps: Mapping[str, Mapping[str, float]], primary_metric: str,
            n_boot: int = 2000, n_perm: int = 10000, n_draws: int = 200, seed: int = 0,
            gaps_aligned: Optional[Mapping[str, Mapping[str, float]]] = None,
            pilots: Sequence[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """The pre-registered analysis (module docstring) as a JSON-ready dict.

    Args:
        runs: run records (module docstring).
        gaps: key -> ``{"value", "lo", "hi"}`` primary gap of that task.
        gaps_aligned: the same with the stage-1 aligned embedder (the stage-1 arm's tasks).
        pilots: the plateau pilots' verdicts (:func:`rank_estimation.plateau.load_verdicts`), reported
            as the check of each task's recipe.
        primary_metric: the primary gap metric's name (recorded).
        n_boot, n_perm, n_draws: bootstrap replicates, permutations, posterior draws.
        seed: seed of every resampling.
    """
    missing: List[str] = []
    curves = _knee_curves(runs)
    tasks = []
    for key in TASK_KEYS:
        curve = curves.get(key, {})
        incomplete = _complete(curve)
        entry: Dict[str, Any] = {"key": key, "level": int(key[4:]) if key in DIAL_KEYS else None,
                                 "gap": dict(gaps[key]) if key in gaps else None,
                                 "seeds_per_rank": {str(k): len(curve.get(k, [])) for k in KNEE_RANKS},
                                 "complete": not incomplete, "knees": None, "errors": None}
        if key not in gaps:
            missing.append(f"{key}: no {primary_metric} gap profile (stage 2)")
        if not curve:
            missing.append(f"{key}: knee sweep not run")
        elif incomplete:
            missing.append(f"{key}: knee sweep incomplete ({'; '.join(incomplete)})")
        if len(curve) >= 2:
            ranks = sorted(curve)
            errs = [curve[k] for k in ranks]
            entry["errors"] = {str(k): [float(v) for v in curve[k]] for k in ranks}
            entry["knees"] = {f"{tol:g}": _knee(ranks, errs, tol, n_boot, seed) for tol in TOLERANCES}
        tasks.append(entry)
    ready = [t for t in tasks if t["complete"] and t["gap"] is not None]
    tol_key = f"{PRIMARY_TOLERANCE:g}"
    out: Dict[str, Any] = {"primary_metric": primary_metric, "primary_tolerance": PRIMARY_TOLERANCE,
                           "tolerances": list(TOLERANCES), "knee_ranks": list(KNEE_RANKS), "min_seeds": MIN_SEEDS,
                           "knee_interval_level": KNEE_LEVEL, "tasks": tasks,
                           "analysed_tasks": [t["key"] for t in ready], "pilots": [dict(v) for v in pilots],
                           "dial": dial_order(gaps)}
    if len(ready) >= 3:
        x = [t["gap"]["value"] for t in ready]
        y = [t["knees"][tol_key]["knee"] for t in ready]
        try:
            out["spearman"] = {**spearman_with_ci(x, y, n_boot=n_boot, seed=seed),
                               "p": permutation_pvalue(x, y, n_perm=n_perm, seed=seed), "n_tasks": len(ready)}
        except ValueError as err:
            out["spearman"] = {"error": str(err)}
        fit = [t for t in ready if t["gap"]["lo"] > 0]
        left_out = [t["key"] for t in ready if t["gap"]["lo"] <= 0]
        try:
            rng = np.random.default_rng(seed)
            reps = {t["key"]: knee_replicates([int(k) for k in t["errors"]], list(t["errors"].values()),
                                              PRIMARY_TOLERANCE, n_draws, seed) for t in fit}
            gap_draws, knee_draws = [[t["gap"]["value"] for t in fit]], [[t["knees"][tol_key]["knee"] for t in fit]]
            for i in range(n_draws):
                sd = [(t["gap"]["hi"] - t["gap"]["lo"]) / (2 * 1.959964) for t in fit]
                gap_draws.append([max(t["gap"]["value"] + s * rng.standard_normal(), 1e-3 * t["gap"]["value"])
                                  for t, s in zip(fit, sd)])
                knee_draws.append([float(reps[t["key"]][i]) for t in fit])
            out["gamma"] = {**gamma_posterior(gap_draws, knee_draws, level=0.9), "tasks": [t["key"] for t in fit],
                            "left_out_gap_ci_contains_0": left_out}
        except ValueError as err:
            out["gamma"] = {"error": str(err), "left_out_gap_ci_contains_0": left_out}
    else:
        missing.append(f"correlation and gamma: {len(ready)} task(s) with a complete knee sweep and a gap, need >= 3 "
                       f"(all {len(TASK_KEYS)} are planned)")
        out["spearman"] = out["gamma"] = None
    out["placebo"] = _placebo(runs, n_boot, seed)
    have = {(r["key"], r["budget"]) for r in out["placebo"]["rows"] if r["n"] >= MIN_SEEDS}
    for key in PLACEBO_KEYS:
        budgets = sorted(b for k, b in have if k == key)
        if len(budgets) < 3:
            missing.append(f"placebo comparison on {key}: {len(budgets)} of 3 budgets with >= {MIN_SEEDS} seeds per arm")
    out["stage1"] = _stage1(runs, curves, gaps, gaps_aligned or {}, n_boot, seed)
    missing += out["stage1"]["missing"]
    out["missing"] = missing
    return out


def dial_order(gaps: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    """The dial levels that have a gap, in level order, and how each level's gap stands to the next
    measured one: ``rises`` (value strictly larger) and ``apart`` (its interval's lower end above the
    previous one's upper end). ``strictly_increasing`` / ``adjacent_apart`` hold when every step does,
    over at least two measured levels (None otherwise)."""
    levels = [int(k[4:]) for k in DIAL_KEYS if k in gaps]
    steps = [{"from": a, "to": b, "rises": gaps[f"dial{b}"]["value"] > gaps[f"dial{a}"]["value"],
              "apart": gaps[f"dial{b}"]["lo"] > gaps[f"dial{a}"]["hi"]} for a, b in zip(levels, levels[1:])]
    return {"levels": levels, "steps": steps,
            "strictly_increasing": all(s["rises"] for s in steps) if steps else None,
            "adjacent_apart": all(s["apart"] for s in steps) if steps else None}


def _f(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def render(result: Mapping[str, Any]) -> str:
    """The Markdown section of the pre-registered analysis, from :func:`analyse`'s dict alone."""
    tol_key = f"{result['primary_tolerance']:g}"
    L = ["## Pre-registered test (results/preregistration.md)", "",
         f"Primary gap metric: `{result['primary_metric']}` (mean over blocks); primary knee tolerance: "
         f"{result['primary_tolerance']:g} (relative); knee ranks {', '.join(map(str, result['knee_ranks']))} with >= "
         f"{result['min_seeds']} seeds each; knee intervals: {int(result['knee_interval_level'] * 100)}% bootstrap over "
         "seeds within each rank.", ""]
    L += ["| task | gap | gap CI | " + " | ".join(f"knee @ {t:g}" for t in result["tolerances"]) + " | seeds per rank |",
          "|---|---|---|" + "---|" * len(result["tolerances"]) + "---|"]
    for t in result["tasks"]:
        g = t["gap"] or {}
        knees = [(f"{t['knees'][f'{tol:g}']['knee']} [{t['knees'][f'{tol:g}']['lo']}, {t['knees'][f'{tol:g}']['hi']}]"
                  if t["knees"] else "-") for tol in result["tolerances"]]
        seeds = ", ".join(f"{k}:{n}" for k, n in t["seeds_per_rank"].items())
        L.append(f"| {t['key']} | {_f(g.get('value'))} | [{_f(g.get('lo'))}, {_f(g.get('hi'))}] | "
                 + " | ".join(knees) + f" | {seeds} |")
    L.append("")
    dial = result.get("dial")
    if dial and dial["steps"]:
        def yes(v: bool) -> str:
            return "yes" if v else "no"

        L.append(f"Gap dial ({len(dial['levels'])} of 7 levels measured: {', '.join(map(str, dial['levels']))}): "
                 f"the primary gap rises strictly from level to level: {yes(dial['strictly_increasing'])}; "
                 f"adjacent levels' intervals apart: {yes(dial['adjacent_apart'])}"
                 + "".join(f"; {s['from']} -> {s['to']}: {'rises' if s['rises'] else 'does not rise'}"
                           f"{'' if s['apart'] else ', intervals overlap'}"
                           for s in dial["steps"] if not (s["rises"] and s["apart"])) + ".")
        L.append("")
    if result.get("pilots"):
        L += ["Plateau pilots (uniform r = 8, seed 0; a task's sweep runs only after its pilot passed): the best "
              "validation value of the first c epochs against that of all E.", "",
              "| pilot | metric | E | c | best of first c | best of all | tail improvement | verdict |",
              "|---|---|---|---|---|---|---|---|"]
        L += [f"| {v['key']} | {v['metric']} | {v['epochs']} | {v['head_epochs']} | {_f(v['best_head'])} | "
              f"{_f(v['best'])} | {100 * v['improvement']:.2f}% | "
              f"{'plateau' if v['passed'] else 'no plateau'} (< {100 * v['tolerance']:g}%) |" for v in result["pilots"]]
        L.append("")
    s = result.get("spearman")
    if s and "error" not in s:
        L.append(f"Spearman(gap, knee @ {tol_key}) over {s['n_tasks']} tasks: rho = {s['rho']:.3f}, "
                 f"{int(s['level'] * 100)}% CI [{s['lo']:.3f}, {s['hi']:.3f}], exact permutation p = {s['p']:.3g}.")
    elif s:
        L.append(f"Spearman(gap, knee): not computed ({s['error']}).")
    else:
        L.append("Spearman(gap, knee): not estimated (see Missing).")
    g = result.get("gamma")
    if g and "error" not in g:
        L.append(f"gamma in log D = log beta + gamma log(1 + knee): P(gamma > 0) = {g['p_positive']:.3f}, "
                 f"{int(g['level'] * 100)}% interval [{g['lo']:.3f}, {g['hi']:.3f}] ({len(g['tasks'])} tasks, "
                 f"{g['draws']} draws; left out, gap interval contains 0: {', '.join(g['left_out_gap_ci_contains_0']) or 'none'}).")
    elif g:
        L.append(f"gamma: not computed ({g['error']}).")
    else:
        L.append("gamma: not estimated (see Missing).")
    L.append("")
    rows = result["placebo"]["rows"]
    if rows:
        L += ["| task | budget | arm | n | mean error | sd |", "|---|---|---|---|---|---|"]
        L += [f"| {r['key']} | {r['budget']:,} | {r['arm']} | {r['n']} | {_f(r['mean'])} | {_f(r['sd'], 2)} |" for r in rows]
        L.append("")
        L += [f"- {d['key']} @ {d['budget']:,}: {d['placebo']} - stage2 = {d['placebo_minus_stage2']:.4g} "
              f"(95% CI [{d['lo']:.4g}, {d['hi']:.4g}]; > 0 favours the stage-2 map)" for d in result["placebo"]["differences"]]
        L.append("")
    else:
        L += ["Equal-budget placebo comparison: no runs yet (see Missing).", ""]
    st = result.get("stage1")
    if st and any(r["knee_source"] or r["knee_aligned"] or r["gap_aligned"] for r in st["rows"]):
        def knee(k: Optional[Mapping[str, Any]]) -> str:
            return f"{k['knee']} [{k['lo']}, {k['hi']}]" if k else "-"

        def gap(g: Optional[Mapping[str, float]]) -> str:
            return f"{_f(g['value'])} [{_f(g['lo'])}, {_f(g['hi'])}]" if g else "-"

        L += [f"Stage 1 in the loop (beside the verdict): knees at {st['tolerance']:g} with the source-initialised "
              "and the stage-1 aligned embedder.", "",
              "| task | gap, source-init | gap, aligned | knee, source-init | knee, aligned | aligned - source |",
              "|---|---|---|---|---|---|"]
        for r in st["rows"]:
            d = r["knee_aligned_minus_source"]
            diff = f"{d['diff']} [{d['lo']:g}, {d['hi']:g}]" if d else "-"
            L.append(f"| {r['key']} | {gap(r['gap_source'])} | {gap(r['gap_aligned'])} | {knee(r['knee_source'])} | "
                     f"{knee(r['knee_aligned'])} | {diff} |")
        L.append("")
    if result["missing"]:
        L += ["Missing (nothing above is estimated from it):", ""] + [f"- {m}" for m in result["missing"]] + [""]
    return "\n".join(L)
