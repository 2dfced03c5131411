"""Benchmark: our batched, cached OTDD vs a plain reference (POT emd per label pair + POT Sinkhorn).

    python scripts/bench_otdd.py                                    # 5000 x 1000, 128-d, 10 labels, GPU
    python scripts/bench_otdd.py --repeats 5 --out results/bench/otdd
    python scripts/bench_otdd.py --n-source 1000 --n-target 200 --ref-clusters 2   # quick CPU check

Two workloads, each timed for ours and for the reference, warm-up excluded, median of repeats:

1. one OTDD between n_target labelled target and n_source labelled source features
   (ours from scratch every repeat: no source cache);
2. one ORCA stage-1 epoch: the target's labels are its clusters, and the loss needs OTDD(cluster k
   as a single-label set, source) for each of the ``labels`` clusters. The reference makes one
   independent call per cluster, as ORCA does with microsoft/otdd; ours is one batched call with
   the source terms cached (as in epochs 2..60; the first, cold epoch is reported too), timed
   forward only (comparable) and forward + backward (what a training step costs).

Both use exact inner OT, eps = 0.1, p = 2, debiased (ORCA's settings). The reference's outer
Sinkhorn runs through POT's torch backend on the same device in float64, its label distances on CPU
with POT ``emd2``, one label pair after another. Ours solves the same label-pair LPs exactly on CPU,
but as an optimal assignment where class sizes are equal (Birkhoff) and on reduced costs, with the
pairs on a thread pool of one worker per usable CPU (``orca.align.otdd.label_distances_exact``), so
its timings depend on the CPU count recorded in the JSON. Values must agree within 1 %; the script
exits with status 1 otherwise.

Data: synthetic Gaussian class blobs with unit total variance per class mean (squared distances
~1-4, so eps = 0.1 is a sharp transport problem as in ORCA). Writes ``{out}.json`` and ``{out}.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch


from orca.align.otdd import OTDD, otdd_reference
from orca.errors import exit_on_error
from orca.runs import git_info, usable_cpus

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-source", type=int, default=5000, help="labelled source features")
    p.add_argument("--n-target", type=int, default=1000, help="labelled target features")
    p.add_argument("--dim", type=int, default=128, help="feature dimension")
    p.add_argument("--labels", type=int, default=10, help="classes per set (= target clusters per epoch)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--ref-clusters", type=int, default=None,
                   help="per-cluster reference calls timed per epoch (default: all); fewer are extrapolated")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/otdd", help="output path stem: writes STEM.json and STEM.md")
    args = p.parse_args(argv)
    for name in ("n_source", "n_target", "dim", "labels", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.labels < 2:
        p.error("--labels must be >= 2 (OTDD needs a labelled source)")
    if args.ref_clusters is not None and not 1 <= args.ref_clusters <= args.labels:
        p.error(f"--ref-clusters must be in 1..{args.labels}")
    return args


def make_data(n_source: int, n_target: int, dim: int, labels: int, seed: int):
    """Source and target Gaussian class blobs; the target's class means are different draws, offset."""
    gen = torch.Generator().manual_seed(seed)

    def blobs(n, offset):
        means = torch.randn(labels, dim, generator=gen) / dim ** 0.5 + offset
        y = torch.arange(n) % labels
        return means[y] + 0.5 * torch.randn(n, dim, generator=gen) / dim ** 0.5, y

    xs, ys = blobs(n_source, 0.0)
    xt, yt = blobs(n_target, 0.3 / dim ** 0.5)
    return xs, ys, xt, yt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> Dict:
    """Median wall time of ``fn`` over ``repeats`` calls (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
        sync(device)
    times: List[float] = []
    result = None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "result": result}


def machine(device: torch.device) -> Dict:
    info = {"device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "usable_cpus": usable_cpus()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        warnings.warn("no CUDA device: benchmarking on CPU; the reference's 5000 x 5000 Sinkhorn self-term "
                      "takes minutes here", RuntimeWarning)
    xs, ys, xt, yt = make_data(args.n_source, args.n_target, args.dim, args.labels, args.seed)
    xs_d, ys_d, xt_d, yt_d = (t.to(device) for t in (xs, ys, xt, yt))
    ref_device = str(device)
    results: Dict[str, Dict] = {}

    # 1. one OTDD between the two labelled sets -----------------------------------------------
    ours = timed(lambda: float(OTDD().distance(xt_d, yt_d, xs_d, ys_d)), device, args.repeats)
    ref = timed(lambda: otdd_reference(xt, yt, xs, ys, device=ref_device), device, args.repeats)
    rel = abs(ours["result"] - ref["result"]) / abs(ref["result"])
    results["single"] = {"ours_s": ours["median_s"], "reference_s": ref["median_s"],
                         "speedup": ref["median_s"] / ours["median_s"], "ours_value": ours["result"],
                         "reference_value": ref["result"], "rel_diff": rel,
                         "ours_times_s": ours["times_s"], "reference_times_s": ref["times_s"]}
    print(f"single OTDD: ours {ours['median_s']:.3f}s  reference {ref['median_s']:.3f}s  "
          f"values {ours['result']:.6g} vs {ref['result']:.6g} (rel diff {rel:.2e})", flush=True)

    # 2. one ORCA epoch: every cluster vs the labelled source -----------------------------------
    clusters = list(range(args.labels))
    n_ref = args.ref_clusters or args.labels
    solver = OTDD()
    t0 = time.perf_counter()
    solver.per_cluster(xt_d, yt_d, xs_d, ys_d)
    sync(device)
    cold = time.perf_counter() - t0

    def ours_forward():
        with torch.no_grad():
            values, _ = solver.per_cluster(xt_d, yt_d, xs_d, ys_d)
        return values.double().cpu().tolist()

    def ours_step():
        x = xt_d.clone().requires_grad_(True)
        values, _ = solver.per_cluster(x, yt_d, xs_d, ys_d)
        weights = torch.bincount(yt_d).to(values.dtype) / yt_d.numel()
        (values * weights).sum().backward()
        return None

    fwd = timed(ours_forward, device, args.repeats, warmup=False)  # the cold call above was the warm-up
    step = timed(ours_step, device, args.repeats)

    def reference_epoch():
        return [otdd_reference(xt[yt == k], torch.zeros(int((yt == k).sum())), xs, ys, device=ref_device)
                for k in clusters[:n_ref]]

    ref_ep = timed(reference_epoch, device, args.repeats, warmup=False)
    ref_epoch_s = ref_ep["median_s"] * args.labels / n_ref
    diffs = [abs(a - b) / abs(b) for a, b in zip(fwd["result"], ref_ep["result"])]
    results["orca_epoch"] = {
        "clusters": args.labels, "reference_calls_timed": n_ref, "reference_extrapolated": n_ref < args.labels,
        "ours_forward_s": fwd["median_s"], "ours_forward_backward_s": step["median_s"], "ours_cold_first_epoch_s": cold,
        "reference_s": ref_epoch_s, "speedup_forward": ref_epoch_s / fwd["median_s"],
        "speedup_forward_backward": ref_epoch_s / step["median_s"],
        "ours_values": fwd["result"], "reference_values": ref_ep["result"], "max_rel_diff": max(diffs),
        "reference_times_s": ref_ep["times_s"], "ours_forward_times_s": fwd["times_s"],
    }
    print(f"ORCA epoch ({args.labels} clusters): ours fwd {fwd['median_s']:.3f}s, fwd+bwd {step['median_s']:.3f}s, "
          f"cold {cold:.3f}s; reference {ref_epoch_s:.3f}s{' (extrapolated)' if n_ref < args.labels else ''}; "
          f"max rel diff {max(diffs):.2e}", flush=True)

    ok = rel < 0.01 and max(diffs) < 0.01
    report = {
        "benchmark": "otdd",
        "command": "python " + shlex.join(sys.argv),
        "args": vars(args),
        "machine": machine(device),
        "git": git_info(),
        "settings": {"inner": "exact", "reg": 0.1, "p": 2, "debiased": True,
                     "ours_dtype": str(xt_d.dtype), "reference_outer": f"POT sinkhorn_log, torch float64 on {ref_device}",
                     "reference_inner": "POT emd2 on CPU, every call",
                     "ours_inner": "assignment (equal sizes) or network simplex on reduced costs, CPU threads",
                     "timing": "median of repeats, warm-up excluded"},
        "data": "Gaussian class blobs: means ~ N(0, I/d), within-class std 0.5/sqrt(d); target means "
                "independent draws offset by 0.3/sqrt(d)",
        "results": results,
        "values_within_1pct": ok,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    s, e = results["single"], results["orca_epoch"]
    gpu = report["machine"].get("gpu", "CPU (no GPU)")
    md = [
        f"# OTDD benchmark ({gpu})",
        "",
        f"`{report['command']}` at commit `{report['git']['commit']}`"
        f"{' (dirty)' if report['git']['dirty'] else ''}; {args.n_source} source x {args.n_target} target, "
        f"{args.dim}-d, {args.labels} labels each; exact inner OT, eps 0.1, debiased; median of {args.repeats}.",
        "",
        "| workload | ours (s) | reference (s) | speed-up | max rel. diff |",
        "|---|---|---|---|---|",
        f"| one OTDD {args.n_target} x {args.n_source} | {s['ours_s']:.3f} | {s['reference_s']:.3f} | "
        f"{s['speedup']:.1f}x | {s['rel_diff']:.1e} |",
        f"| ORCA epoch, {args.labels} clusters, forward | {e['ours_forward_s']:.3f} | {e['reference_s']:.3f}"
        f"{'*' if e['reference_extrapolated'] else ''} | {e['speedup_forward']:.1f}x | {e['max_rel_diff']:.1e} |",
        f"| ORCA epoch, forward + backward | {e['ours_forward_backward_s']:.3f} | - | "
        f"{e['speedup_forward_backward']:.1f}x vs reference forward | |",
        f"| ORCA first (cold) epoch, forward | {e['ours_cold_first_epoch_s']:.3f} | - | | |",
        "",
        "Reference: POT `emd2` for every label pair on CPU, then POT `sinkhorn_log` (torch float64 on "
        f"{ref_device}) for the three transport terms, recomputed on every call."
        + (f" *Extrapolated from {n_ref} of {args.labels} per-cluster calls." if e["reference_extrapolated"] else ""),
        "",
        f"Values within 1 %: **{'yes' if ok else 'NO'}**.",
    ]
    Path(f"{out}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}.json and {out}.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
