"""The figures of the rank-gap hypothesis report: knees, gaps and Delta W ranks, drawn only from data
that exist. Each function returns the file names it wrote (PNG, no software version in the metadata,
so a file depends on the data alone).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np


def _save(fig, out: Path, name: str, made: List[str]) -> None:
    """Write ``fig`` to ``out / name`` at the report's resolution, close it, and record the name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110, metadata={"Software": None})
    plt.close(fig)
    made.append(name)


def plots(out: Path, knees: dict, tg: dict, dw: List[dict]) -> List[str]:
    """(a) rank vs error per task, (b) task gap vs knee, (c) block gap vs the ranks of Delta W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: List[str] = []
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
        _save(fig, out, "hypothesis_rank_vs_error.png", made)
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
        _save(fig, out, "hypothesis_gap_vs_knee.png", made)
    if dw:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for item in dw:
            label = f"{item['run'].task} s{item['run'].seed}"
            axes[0].scatter(item["D"], item["energy"], label=label)
            axes[1].scatter(item["D"], item["stable"], label=label)
        axes[0].set(xlabel="block gap D_i", ylabel="energy rank of Delta W (mean over Linears)")
        axes[1].set(xlabel="block gap D_i", ylabel="stable rank of Delta W (mean over Linears)")
        axes[0].legend(fontsize=8)
        _save(fig, out, "hypothesis_gap_vs_delta_w.png", made)
    return made


def prereg_plots(out: Path, result: dict) -> List[str]:
    """Gap vs dial level, knee vs gap, error vs rank per task, the pilots' curves: each only from data that exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: List[str] = []
    tol = f"{result['primary_tolerance']:g}"
    dial = [t for t in result["tasks"] if t["level"] is not None and t["gap"]]
    if dial:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar([t["level"] for t in dial], [t["gap"]["value"] for t in dial], capsize=3, marker="o",
                    yerr=[[t["gap"]["value"] - t["gap"]["lo"] for t in dial], [t["gap"]["hi"] - t["gap"]["value"] for t in dial]])
        ax.set(xlabel="dial level", ylabel=f"{result['primary_metric']} (mean over blocks)", title="gap vs dial level")
        _save(fig, out, "hypothesis_dial_gap.png", made)
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
        _save(fig, out, "hypothesis_knee_vs_gap.png", made)
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
        _save(fig, out, "hypothesis_error_vs_rank.png", made)
    pilots = result.get("pilots") or []
    if pilots:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in pilots:
            best = np.minimum.accumulate(np.asarray(v["curve"], dtype=float))
            epochs = np.arange(1, len(best) + 1)
            line, = ax.plot(epochs / len(best), best / best[-1], label=f"{v['key']} ({v['epochs']} epochs)")
            ax.axvline(v["head_epochs"] / len(best), color=line.get_color(), lw=0.6, ls=":")
        ax.axhline(1 + pilots[0]["tolerance"], color="grey", lw=0.8, ls="--")
        ax.set_ylim(0.95, 1.5)
        ax.set(xlabel="fraction of the epochs", ylabel="best validation so far / final best",
               title="plateau pilots (dotted: start of the last 20%; dashed: 2%)")
        ax.legend(fontsize=7)
        _save(fig, out, "hypothesis_pilots.png", made)
    return made
