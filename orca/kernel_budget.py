"""How fast could an adapter step be? A ceiling from one measured kernel profile.

Why: is LoRA r = 8 at >= 1.3x full fine-tuning's img/s within reach? A LoRA step does ~2/3 of
full fine-tuning's FLOPs (no weight gradients), but only part of a step is GEMM time: the rest
(attention, LayerNorm, GELU, residual adds, window shifts) must run for LoRA too, since every
layer's adapter needs the gradient that flows through it. Whether a target ratio is reachable at
all is therefore a question about the profile, not about effort. This module answers it from the
files ``scripts/bench_train.py --profile`` writes (the ``*_profile.json`` kernel summary and the
``*.json`` with each configuration's FLOPs), so the argument can be rerun on any machine's run
instead of being redone by hand.

The model (stated so it can be disputed):

- *ideal GEMM time* of a configuration = the base's (full fine-tuning's) GEMM ms x the ratio of
  their FLOPs per image (``torch.utils.flop_counter``). That is: every GEMM FLOP, the rank-r
  products included, runs at the rate the base's large GEMMs reach, with no extra memory traffic.
  The whole-step FLOPs include the window attention's (~2% of Swin-B's); they scale both sides
  alike.
- its *non-GEMM time* is what it measured (attention, elementwise, copies, optimizer).
- *ceiling* = base device ms / (ideal GEMM + non-GEMM): the ratio the configuration would reach
  if its GEMMs cost no more than their FLOPs.
- *GEMM excess* = measured GEMM ms - ideal GEMM ms: for LoRA, the price of the rank-r products
  (skinny GEMMs that each re-read an N x d activation) and of the base GEMMs' changed shapes.
- *allowed excess* for a target = base ms / target - non-GEMM ms - ideal GEMM ms: how much GEMM
  excess a step may keep and still reach the target (negative: unreachable even at zero).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from orca.errors import OrcaError


class BudgetInputError(OrcaError, ValueError):
    """The profile and the benchmark cannot be read together (wrong files, a CPU-only profile, a
    configuration missing from one of them)."""


def _by_key(rows: Sequence[Dict[str, Any]], what: str) -> Dict[tuple, Dict[str, Any]]:
    out = {}
    for row in rows:
        try:
            out[(row["config"], int(row["batch"]))] = row
        except KeyError as e:
            raise BudgetInputError(f"a {what} result has no {e.args[0]!r}: is this a bench_train.py {what} file?") from e
    return out


def kernel_budget(profile: Dict[str, Any], bench: Dict[str, Any], base: str = "full",
                  targets: Sequence[float] = (1.3,)) -> List[Dict[str, Any]]:
    """One row per (configuration, batch) of ``profile`` other than ``base``: measured device ms,
    GEMM and non-GEMM ms, ideal GEMM ms, GEMM excess, the ceiling ratio and, per target ratio, the
    allowed excess (see the module docstring).

    Args:
        profile: a ``*_profile.json`` written by ``bench_train.py --profile`` (device timing: a GPU run).
        bench: the ``*.json`` of the same run, for FLOPs per image and img/s.
        base: the configuration the ratios are taken against.
        targets: ratios (config img/s over base img/s) to price.

    Raises:
        BudgetInputError: the profile was timed on the CPU, a configuration of the profile is missing
            from the benchmark or has no FLOP count, or the base was not profiled at a batch size.
    """
    prof_rows = _by_key(profile.get("results", []), "profile")
    bench_rows = _by_key(bench.get("results", []), "benchmark")
    if not prof_rows:
        raise BudgetInputError("the profile has no results")
    rows = []
    for (config, batch), prof in sorted(prof_rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if config == base:
            continue
        summary = prof["summary"]
        if summary.get("timing") != "device":
            raise BudgetInputError(f"{config} at batch {batch} was profiled with {summary.get('timing')!r} timing; "
                                   "a kernel budget needs device (GPU kernel) times")
        if (base, batch) not in prof_rows:
            have = sorted(c for c, b in prof_rows if b == batch)
            raise BudgetInputError(f"no {base!r} profile at batch {batch} to compare {config} with (profiled: {have})")
        base_summary = prof_rows[(base, batch)]["summary"]
        flops = {}
        for name in (config, base):
            got = bench_rows.get((name, batch), {}).get("gflop_per_img")
            if not got:
                raise BudgetInputError(f"the benchmark has no FLOP count for {name} at batch {batch}: "
                                       "pass the .json written by the same bench_train.py run as the profile")
            flops[name] = float(got)
        flop_ratio = flops[config] / flops[base]
        base_ms = base_summary["device_ms"]
        ideal_gemm = base_summary["gemm_ms"] * flop_ratio
        non_gemm = summary["device_ms"] - summary["gemm_ms"]
        row = {"config": config, "batch": batch, "base": base,
               "device_ms": summary["device_ms"], "base_device_ms": base_ms,
               "gemm_ms": summary["gemm_ms"], "base_gemm_ms": base_summary["gemm_ms"],
               "non_gemm_ms": non_gemm, "base_non_gemm_ms": base_ms - base_summary["gemm_ms"],
               "flop_ratio": flop_ratio, "ideal_gemm_ms": ideal_gemm,
               "gemm_excess_ms": summary["gemm_ms"] - ideal_gemm,
               "device_ratio": base_ms / summary["device_ms"],
               "ceiling": base_ms / (ideal_gemm + non_gemm),
               "allowed_excess_ms": {f"{t:g}": base_ms / t - non_gemm - ideal_gemm for t in targets}}
        img = {name: bench_rows.get((name, batch), {}).get("img_per_s") for name in (config, base)}
        if img[config] and img[base]:
            row["img_per_s_ratio"] = img[config] / img[base]
        rows.append(row)
    return rows


def budget_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as a markdown table (times in ms per step, device time summed over kernels)."""
    targets = list(rows[0]["allowed_excess_ms"]) if rows else []
    head = ["batch", "config", "device ms (base)", "GEMM ms (base)", "non-GEMM ms (base)", "FLOPs vs base",
            "ideal GEMM ms", "GEMM excess ms", "measured ratio (img/s)", "ceiling"]
    head += [f"excess allowed for {t}x" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = f"{r['device_ratio']:.2f}x"
        if "img_per_s_ratio" in r:
            measured += f" ({r['img_per_s_ratio']:.2f}x)"
        cells = [str(r["batch"]), r["config"],
                 f"{r['device_ms']:.1f} ({r['base_device_ms']:.1f})", f"{r['gemm_ms']:.1f} ({r['base_gemm_ms']:.1f})",
                 f"{r['non_gemm_ms']:.1f} ({r['base_non_gemm_ms']:.1f})", f"{r['flop_ratio']:.3f}",
                 f"{r['ideal_gemm_ms']:.1f}", f"{r['gemm_excess_ms']:.1f}", measured, f"**{r['ceiling']:.2f}x**"]
        cells += [f"{r['allowed_excess_ms'][t]:.2f}" for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
