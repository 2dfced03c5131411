"""Markdown of the training benchmarks' results: the sdpa-against-bmm table and the profile report.

Why apart from the benchmark script: the script chooses, runs and times configurations; turning
rows and profile summaries into tables is a separate concern with its own reading conventions
(what "device ms" and each kernel category mean), kept next to :func:`orca.bench.summarize_profile`,
whose output it renders.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from orca.bench import PROFILE_CATEGORIES, short_kernel_name


def attention_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """With both attention kinds timed: each configuration's sdpa img/s over its bmm img/s (one run)."""
    rate = {(r["batch"], r["config"]): r["img_per_s"] for r in rows if r["status"] == "ok"}
    pairs = [(b, name, rate[(b, name + "+sdpa")] / ips) for (b, name), ips in rate.items()
             if (b, name + "+sdpa") in rate]
    if not pairs:
        return []
    return ["", "Window attention through F.scaled_dot_product_attention (`+sdpa`) against timm's explicit "
            "matmuls (rows without it; `vs full` and `vs peft` compare rows of the same kind):", "",
            "| batch | config | sdpa / bmm img/s |", "|---|---|---|",
            *[f"| {b} | {name} | {ratio:.2f}x |" for b, name, ratio in pairs]]


def profile_sections(keys: Sequence[str], summaries: Dict[str, Dict[str, Any]], errors: Dict[str, str],
                     cuda: bool) -> List[str]:
    """The body of a profile report: how to read it, a per-step summary, device time by category,
    then each configuration's top kernels (and, on CUDA, its top CPU-side ops).

    Args:
        keys: ``"{config}@{batch}"`` in report order.
        summaries: :func:`orca.bench.summarize_profile` of each key that profiled, plus its
            ``timed_ms`` (the unprofiled step time, or None).
        errors: why each key that did not profile failed.
        cuda: whether the profile has device (kernel) events; on CPU the "device" figures are the
            ops' self CPU time.
    """
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines: List[str] = []
    if cuda:
        lines += ["Device ms = summed durations of the device events (kernels, memcpy, memset) per step: the GPU's busy "
                  "time, not the step's span; busy % = device ms over the *unprofiled* step time of the timing "
                  "(timed ms), so 100 - busy % is the time the GPU waited (launch/CPU overhead, syncs). CPU ms = self "
                  "CPU time of every op and CUDA runtime call per step, summed over threads (the autograd engine's "
                  "included). Kernels = device events per step; launch calls = cudaLaunchKernel-type runtime calls.", ""]
    else:
        lines += ["**No CUDA here: the \"device\" columns are the ops' self CPU time** (device ms = CPU ms), "
                  "kernels = profiled op events per step (nested ops included), and the categories go by op name.", ""]
    lines += ["Categories go **by kernel name and are approximate**: GEMM = names with gemm/gemv/sm90/cutlass/cublas/"
              "nvjet/matmul/xmma/splitK/mm/bmm/addmm (convolutions too: implicit GEMMs); attention = flash/fmha/sdpa; "
              "optimizer = adam/_foreach/multi_tensor_apply; copy/cast = copy/memcpy/cast/clone/`to`/`_to_copy` and "
              "Inductor kernels that only cast or lay out; elementwise/reduction = elementwise/reduce/norm/softmax/gelu/"
              "Triton pointwise and reduction kernels (a fused Triton kernel that also casts counts here); the rest is "
              "other. A GEMM with a fused epilogue counts as GEMM.", "",
              "## Summary (per step)", "",
              "| batch | config | timed ms | device ms | busy % | CPU ms | kernels | launch calls | GEMM ms | "
              "non-GEMM ms | profiled wall ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        name, b = k.rsplit("@", 1)
        if k not in summaries:
            lines.append(f"| {b} | {name} | profiling failed: {errors[k]} | | | | | | | | |")
            continue
        s = summaries[k]
        busy = f"{100 * s['device_ms'] / s['timed_ms']:.0f}%" if s["timed_ms"] else "n/a"
        lines.append(f"| {b} | {name} | {f(s['timed_ms'])} | {f(s['device_ms'])} | {busy} | {f(s['cpu_ms'])} | "
                     f"{s['kernels_per_step']:.0f} | {s['launch_calls_per_step']:.0f} | {f(s['gemm_ms'])} | "
                     f"{f(s['non_gemm_ms'])} | {f(s['wall_ms_per_step'])} |")
    lines += ["", "## Device time by category (ms per step, % of the step's device time)", "",
              "| batch | config | " + " | ".join(PROFILE_CATEGORIES) + " |", "|---|---|" + "---|" * len(PROFILE_CATEGORIES)]
    for k, s in summaries.items():
        name, b = k.rsplit("@", 1)
        lines.append(f"| {b} | {name} | " + " | ".join(
            f"{v:.2f} ({100 * v / s['device_ms']:.0f}%)" if s["device_ms"] else f"{v:.2f}"
            for v in s["categories_ms"].values()) + " |")
    for k, s in summaries.items():
        name, b = k.rsplit("@", 1)
        what = "kernels" if cuda else "ops"
        lines += ["", f"## {name}, batch {b}", "",
                  f"Device {s['device_ms']:.2f} ms/step"
                  + (f" ({100 * s['device_ms'] / s['timed_ms']:.0f}% of the timed {s['timed_ms']:.2f} ms)"
                     if s["timed_ms"] else "")
                  + f", CPU {s['cpu_ms']:.2f} ms/step, {s['kernels_per_step']:.0f} {'kernels' if cuda else 'op events'}"
                  f"/step" + (f", {s['launch_calls_per_step']:.0f} launch calls/step taking "
                              f"{s['launch_calls_cpu_ms']:.2f} ms of CPU" if cuda else "")
                  + f"; profiled wall {s['wall_ms_per_step']:.2f} ms/step (profiler overhead included)."
                  + (" **The profiler recorded no device events here: the device figures are CPU self time.**"
                     if cuda and s["timing"] != "device" else ""), "",
                  f"Top {len(s['top'])} {what} by {'device' if cuda else 'self CPU'} time:", "",
                  "| # | name | category | calls/step | ms/step | % of step |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(s["top"], 1):
            lines.append(f"| {i} | `{short_kernel_name(r['name'])}` | {r['category']} | {r['calls_per_step']:.1f} | "
                         f"{r['ms_per_step']:.3f} | {100 * r['share']:.1f}% |")
        if cuda:  # where the CPU side spends its time (launch-bound steps show it here)
            lines += ["", "Top 10 CPU-side ops by self CPU time:", "", "| name | calls/step | self CPU ms/step |",
                      "|---|---|---|"]
            lines += [f"| `{short_kernel_name(r['name'])}` | {r['calls_per_step']:.1f} | {r['self_cpu_ms_per_step']:.3f} |"
                      for r in s["cpu_top"][:10]]
    return lines
