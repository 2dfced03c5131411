"""Benchmark: our OTDD vs microsoft/otdd as ORCA calls it, side by side in one process on the same data.

    python scripts/bench_otdd.py --otdd-src PATH                    # CPU or the default GPU
    python scripts/bench_otdd.py --otdd-src PATH --device cuda --repeats 5
    python scripts/bench_otdd.py                                   # ours only (no microsoft/otdd column)

PATH is a local checkout of microsoft/otdd (github.com/microsoft/otdd); it is imported from there and
never installed or copied. Its call is ORCA's: a fresh ``DatasetDistance(src, tgt,
inner_ot_method='exact', debiased_loss=True, inner_ot_debiased=True, p=2, inner_ot_p=2,
entreg=1e-1, device=...)`` per call, then ``.distance(maxsamples=len(src))``. Ours is
``orca.align.otdd.OTDD()`` with its defaults, which compute the same quantity with the same fixed
geomloss schedule (values agree to float32 rounding; a batch of clusters shares one schedule).

Workloads (float32, the timed median of ``--repeats`` after one untimed warm-up call):

1. ``single``: one OTDD of a 2000-sample, 10-label source and a 500-sample, 5-label target;
   ours from a fresh object (nothing cached).
2. ``cluster``: ORCA's per-cluster call, a 5000-sample 10-label source vs one 130-sample cluster
   as a single-label set; ours cold (fresh object, as microsoft/otdd) and cached (the source
   terms kept, as in epochs 2..60 of stage 1).
3. ``epoch``: one stage-1 epoch, 10 clusters of 130 vs the same source, forward and backward of
   ORCA's loss sum_k (n_k / n) OTDD_k w.r.t. the target features; microsoft/otdd's side is one
   fresh DatasetDistance per cluster (as ORCA), ours one batched call, cold and cached.

Data: Gaussian class blobs in ``--dim`` dimensions whose class means have RMS norm ``--spread``
and whose within-class RMS radius is half of it (squared distances of ~``2 spread^2``, the scale of
raw embedder features); source and target means are independent draws.

microsoft/otdd imports plotting and clustering packages at module level that its distance does not
use; those missing here are replaced by inert stand-ins (listed in the JSON), and geomloss >= 0.3
keeps its ``utils`` module under ``geomloss._legacy``, which is aliased. Writes ``{out}.json`` and
``{out}.md``; exits 1 if a value differs from microsoft/otdd's by more than 0.5 %.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shlex
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import TensorDataset

from orca.align.otdd import OTDD
from orca.errors import exit_on_error
from orca.runs import git_info, usable_cpus

TOLERANCE = 0.005
#: Packages microsoft/otdd imports at module level for plotting, clustering, text data or progress bars.
OPTIONAL_DEPS = ("seaborn", "adjustText", "munkres", "matplotlib", "mpl_toolkits", "sklearn", "PIL", "joblib",
                 "tqdm", "h5py", "torchtext")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--otdd-src", default=None, help="local checkout of microsoft/otdd (omit: ours only)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension")
    p.add_argument("--spread", type=float, default=10.0, help="RMS norm of the class means")
    p.add_argument("--n-source", type=int, default=5000, help="source samples of the cluster and epoch workloads")
    p.add_argument("--cluster-size", type=int, default=130, help="samples per target cluster")
    p.add_argument("--clusters", type=int, default=10, help="target clusters per epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--workloads", default="single,cluster,epoch", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/otdd", help="output path stem: writes STEM.json and STEM.md")
    args = p.parse_args(argv)
    for name in ("dim", "n_source", "cluster_size", "clusters", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = sorted(set(args.workloads) - {"single", "cluster", "epoch"})
    if bad:
        p.error(f"--workloads: unknown {bad}; choose from single, cluster, epoch")
    if args.otdd_src is not None and not (Path(args.otdd_src) / "otdd" / "pytorch" / "distance.py").is_file():
        p.error(f"--otdd-src {args.otdd_src}: no otdd/pytorch/distance.py there; pass a microsoft/otdd checkout")
    return args


# ----------------------------------------------------------------------------- microsoft/otdd
class _Inert:
    """Stands in for any attribute or call of a package microsoft/otdd imports but never uses here."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _Progress:
    """tqdm's interface without output: iterate the wrapped iterable."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        if spec.name.split(".")[0] == "tqdm":
            module.tqdm = _Progress
        return module

    def exec_module(self, module):
        pass


def load_microsoft_otdd(path: str):
    """``(DatasetDistance, stand-ins)`` from a microsoft/otdd checkout, shimming what its import needs."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # its per-label-pair progress bars
    missing = [name for name in OPTIONAL_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        sys.meta_path.insert(0, _InertFinder(missing))
    import geomloss

    if not hasattr(geomloss, "utils"):  # geomloss >= 0.3 moved it; microsoft/otdd calls geomloss.utils.*
        from geomloss._legacy import utils

        geomloss.utils = utils
        sys.modules["geomloss.utils"] = utils
    package = Path(path).resolve() / "otdd"  # the checkout's package, loaded by location
    spec = importlib.util.spec_from_file_location("otdd", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    sys.modules["otdd"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["otdd"])
    from otdd.pytorch.distance import DatasetDistance

    logging.getLogger("otdd").setLevel(logging.ERROR)
    return DatasetDistance, missing


def microsoft_call(dataset_distance, xs, ys, xt, yt, device: torch.device) -> torch.Tensor:
    """ORCA's call: a fresh DatasetDistance on the two labelled sets, ``distance(maxsamples=len(src))``.

    Features stay on ``device``, labels go to the host: microsoft/otdd filters labels with numpy
    (``np.isin``), which cannot read a CUDA tensor, and ORCA's k-means labels are host arrays.
    """
    dist = dataset_distance(TensorDataset(xs, ys.cpu()), TensorDataset(xt, yt.cpu()), inner_ot_method="exact",
                            debiased_loss=True, inner_ot_debiased=True, p=2, inner_ot_p=2, entreg=1e-1,
                            device=str(device), verbose=0)
    return dist.distance(maxsamples=len(xs))


# ----------------------------------------------------------------------------- data, timing
def blobs(n: int, labels: int, dim: int, spread: float, gen: torch.Generator):
    """``n`` samples of ``labels`` Gaussian classes (labels cycle, so class sizes differ by <= 1)."""
    means = torch.randn(labels, dim, generator=gen) * spread / dim ** 0.5
    y = torch.arange(n) % labels
    return means[y] + torch.randn(n, dim, generator=gen) * 0.5 * spread / dim ** 0.5, y


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


def rel_diff(ours: List[float], theirs: Optional[List[float]]) -> Optional[float]:
    if theirs is None:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))


# ----------------------------------------------------------------------------- workloads
def run_single(args, device, dd) -> Dict:
    gen = torch.Generator().manual_seed(args.seed)
    xs, ys = blobs(2000, 10, args.dim, args.spread, gen)
    xt, yt = blobs(500, 5, args.dim, args.spread, gen)
    xs, ys, xt, yt = (t.to(device) for t in (xs, ys, xt, yt))
    ours = timed(lambda: float(OTDD().distance(xt, yt, xs, ys)), device, args.repeats)
    out = {"shape": "2000 x 500, 10 vs 5 labels", "ours_s": ours["median_s"], "ours_times_s": ours["times_s"],
           "ours_value": ours["result"]}
    if dd is not None:
        theirs = timed(lambda: float(microsoft_call(dd, xs, ys, xt, yt, device)), device, args.repeats)
        out.update(otdd_s=theirs["median_s"], otdd_times_s=theirs["times_s"], otdd_value=theirs["result"],
                   speedup=theirs["median_s"] / ours["median_s"], rel_diff=rel_diff([ours["result"]], [theirs["result"]]))
    return out


def epoch_data(args, device):
    gen = torch.Generator().manual_seed(args.seed + 1)
    xs, ys = blobs(args.n_source, 10, args.dim, args.spread, gen)
    xt, clusters = blobs(args.cluster_size * args.clusters, args.clusters, args.dim, args.spread, gen)
    return tuple(t.to(device) for t in (xs, ys, xt, clusters))


def run_cluster(args, device, dd) -> Dict:
    xs, ys, xt, clusters = epoch_data(args, device)
    x1 = xt[clusters == 0]
    y1 = torch.zeros(x1.shape[0], dtype=torch.long, device=device)
    cold = timed(lambda: float(OTDD().distance(x1, y1, xs, ys)), device, args.repeats)
    solver = OTDD()
    cached = timed(lambda: float(solver.distance(x1, y1, xs, ys)), device, args.repeats)
    out = {"shape": f"{args.n_source} x {x1.shape[0]}, 10 source labels vs 1 cluster",
           "ours_cold_s": cold["median_s"], "ours_cached_s": cached["median_s"], "ours_value": cold["result"],
           "ours_cold_times_s": cold["times_s"], "ours_cached_times_s": cached["times_s"]}
    if dd is not None:
        theirs = timed(lambda: float(microsoft_call(dd, xs, ys, x1, y1, device)), device, args.repeats)
        out.update(otdd_s=theirs["median_s"], otdd_times_s=theirs["times_s"], otdd_value=theirs["result"],
                   speedup_cold=theirs["median_s"] / cold["median_s"],
                   speedup_cached=theirs["median_s"] / cached["median_s"],
                   rel_diff=rel_diff([cold["result"], cached["result"]], [theirs["result"]] * 2))
    return out


def run_epoch(args, device, dd) -> Dict:
    xs, ys, xt, clusters = epoch_data(args, device)
    weights = torch.bincount(clusters).to(xt.dtype) / clusters.numel()

    def ours_step(solver: OTDD) -> List[float]:
        x = xt.clone().requires_grad_(True)
        values, _ = solver.per_cluster(x, clusters, xs, ys)
        (values * weights).sum().backward()
        return values.detach().double().cpu().tolist()

    cold = timed(lambda: ours_step(OTDD()), device, args.repeats)
    solver = OTDD()
    cached = timed(lambda: ours_step(solver), device, args.repeats)
    out = {"shape": f"{args.clusters} clusters of {args.cluster_size} vs {args.n_source} x 10 labels, "
                    "forward + backward",
           "ours_cold_s": cold["median_s"], "ours_cached_s": cached["median_s"], "ours_values": cold["result"],
           "ours_cold_times_s": cold["times_s"], "ours_cached_times_s": cached["times_s"]}
    if dd is not None:
        def theirs_step() -> List[float]:
            x = xt.clone().requires_grad_(True)
            values = []
            for k in range(args.clusters):
                rows = clusters == k
                values.append(microsoft_call(dd, xs, ys, x[rows], torch.zeros_like(clusters[rows]), device))
            values = torch.stack([v.reshape(()) for v in values])
            (values * weights).sum().backward()
            return values.detach().double().cpu().tolist()

        theirs = timed(theirs_step, device, args.repeats)
        out.update(otdd_s=theirs["median_s"], otdd_times_s=theirs["times_s"], otdd_values=theirs["result"],
                   speedup_cold=theirs["median_s"] / cold["median_s"],
                   speedup_cached=theirs["median_s"] / cached["median_s"],
                   rel_diff=max(rel_diff(cold["result"], theirs["result"]), rel_diff(cached["result"], theirs["result"])))
    return out


RUNNERS = {"single": run_single, "cluster": run_cluster, "epoch": run_epoch}


def render(report: Dict) -> str:
    res, args = report["results"], report["args"]
    dev = report["machine"].get("gpu", f"CPU, {report['machine']['usable_cpus']} cores")
    has = report["microsoft_otdd"] is not None

    def s(v):
        return "-" if v is None else f"{v:.3f}"

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    def r(v):
        return "-" if v is None else f"{100 * v:.2f} %"

    lines = [f"# OTDD: ours vs microsoft/otdd ({dev})", "",
             f"`{report['command']}` at commit `{report['git']['commit']}`"
             f"{' (dirty)' if report['git']['dirty'] else ''}; {args['dim']}-d Gaussian class blobs, spread "
             f"{args['spread']:g}; float32; median of {args['repeats']} after a warm-up call.", "",
             "| workload | microsoft/otdd (s) | ours cold (s) | ours cached (s) | speed-up cold | speed-up cached "
             "| value diff |", "|---|---|---|---|---|---|---|"]
    if "single" in res:
        e = res["single"]
        lines.append(f"| one call, {e['shape']} | {s(e.get('otdd_s'))} | {s(e['ours_s'])} | - | "
                     f"{x(e.get('speedup'))} | - | {r(e.get('rel_diff'))} |")
    for key, name in (("cluster", "ORCA's per-cluster call"), ("epoch", "one stage-1 epoch")):
        if key in res:
            e = res[key]
            lines.append(f"| {name}, {e['shape']} | {s(e.get('otdd_s'))} | {s(e['ours_cold_s'])} | "
                         f"{s(e['ours_cached_s'])} | {x(e.get('speedup_cold'))} | {x(e.get('speedup_cached'))} | "
                         f"{r(e.get('rel_diff'))} |")
    lines.append("")
    if has:
        lines += ["microsoft/otdd: a fresh `DatasetDistance(..., inner_ot_method='exact', debiased_loss=True, "
                  "inner_ot_debiased=True, p=2, inner_ot_p=2, entreg=1e-1)` per call and "
                  "`.distance(maxsamples=len(src))`, as ORCA calls it (one per cluster in the epoch). Ours: "
                  "`orca.align.otdd.OTDD()`; cold = a fresh object, cached = source terms kept (stage 1's "
                  "epochs 2..60). Value diff: largest relative difference of the values.",
                  "", f"Values within {100 * TOLERANCE:.1f} %: **{'yes' if report['values_within_tolerance'] else 'NO'}**."]
    else:
        lines.append("microsoft/otdd column skipped: no `--otdd-src` checkout was given.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dd, stand_ins = None, None
    if args.otdd_src:
        dd, stand_ins = load_microsoft_otdd(args.otdd_src)
    else:
        print("note: no --otdd-src given; timing ours only (the microsoft/otdd column is skipped)", flush=True)
    results = {}
    for name in args.workloads:
        results[name] = RUNNERS[name](args, device, dd)
        print(name, json.dumps({k: v for k, v in results[name].items() if not k.endswith("times_s")}), flush=True)
    diffs = [e["rel_diff"] for e in results.values() if e.get("rel_diff") is not None]
    ok = all(d <= TOLERANCE for d in diffs)
    report = {
        "benchmark": "otdd",
        "command": "python " + shlex.join(sys.argv),
        "args": vars(args),
        "machine": machine(device),
        "git": git_info(),
        "microsoft_otdd": None if dd is None else {"path": args.otdd_src, "stand_ins_for_unused_imports": stand_ins},
        "settings": {"call": "DatasetDistance(inner_ot_method='exact', debiased_loss=True, inner_ot_debiased=True, "
                             "p=2, inner_ot_p=2, entreg=0.1).distance(maxsamples=len(src))",
                     "ours": "orca.align.otdd.OTDD() defaults", "dtype": "float32",
                     "timing": "median of repeats after one warm-up call"},
        "results": results,
        "values_within_tolerance": ok if diffs else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{out}.md").write_text(render(report))
    print(f"wrote {out}.json and {out}.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
