"""Time stage 2's gap profile: every gap metric at all 24 Swin-B blocks, 5,000 source + 5,000 target samples.

    python scripts/bench_stage2.py                                   # the target setting, one GPU
    python scripts/bench_stage2.py --metrics mmd sinkhorn --n 2000
    python scripts/bench_stage2.py --n-boot 20                       # with bootstrap intervals
    python scripts/bench_stage2.py --metric-kwargs '{"otdd": {"inner_max_samples": 64}}'
    python scripts/bench_stage2.py --device cpu --n 32 --body swin_tiny_patch4_window7_224 --img-size 32 \\
        --body-kwargs '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}' \\
        --out /tmp/bench                                             # CPU smoke test

Setup: swin_base_patch4_window7_224 with random weights (timm init, ``model.weights=none``; the
metrics' cost depends on sample count and feature width, not on the weights). Source stream:
N(0, 1) images at 224 px (or ``--source fractal``: rendered fractal images with their classes)
through the body's patch embedding, then the body. Target stream: smooth random 3-channel 85x85
fields (Darcy-85's shape; a 11x11 Gaussian grid upsampled bicubically, offset) through an embedder
tiled from the patch embedding (ORCA's init), then the same body. Features are token-averaged at the
output of every block (``rank_estimation.features``), bf16 autocast on CUDA. OTDD gets 10 random
classes per side (or the fractal classes) -- the label values change the numbers, not the cost.

Timing: each metric first runs once on the first block (warm-up: CUDA context, kernels, cuBLAS
handles; excluded), then :func:`rank_estimation.gaps.gap_profile` times each metric over all
blocks with a CUDA synchronize after every call. The feature capture is timed separately.

Writes ``{out}/stage2.json`` and ``{out}/stage2.md`` (default ``results/bench``) with the machine,
git commit (+ dirty flag) and the exact command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from orca.errors import exit_on_error

REPO = Path(__file__).resolve().parents[1]

GOAL_S = 30.0  # the target: all metrics together under 30 s on one H100


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from rank_estimation.gaps import GAP_METRICS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="samples per side (source and target)")
    p.add_argument("--metrics", nargs="+", default=GAP_METRICS.names(), choices=GAP_METRICS.names())
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench", help="directory for stage2.json/.md")
    p.add_argument("--n-boot", type=int, default=0, help="bootstrap resamples per (block, metric)")
    p.add_argument("--metric-kwargs", type=json.loads, default={},
                   help='JSON per-metric options, e.g. \'{"otdd": {"inner_max_samples": 64}}\'')
    p.add_argument("--body", default="swin_base_patch4_window7_224")
    p.add_argument("--body-kwargs", type=json.loads, default={}, help="JSON timm kwargs for reduced bodies")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--target-size", type=int, default=85, help="target field resolution (Darcy-85)")
    p.add_argument("--source", choices=("random", "fractal"), default="random")
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass of the capture")
    p.add_argument("--classes", type=int, default=10, help="random OTDD classes per side")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 4:
        p.error(f"--n={args.n} must be >= 4")
    return args


def random_images(n: int, size: int, batch: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Seeded N(0, 1) images ``[b, 3, size, size]``, made on ``device`` batch by batch (3 GB never resident)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch):
        yield torch.randn(min(batch, n - start), 3, size, size, generator=gen, device=device)


def smooth_fields(n: int, size: int, batch: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Seeded smooth random fields ``[b, 3, size, size]`` with an offset: a target unlike the source."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch):
        coarse = torch.randn(min(batch, n - start), 3, 11, 11, generator=gen, device=device)
        yield F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) + 0.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from orca.bodies import create_body
    from orca.embedders import ConvEmbedder2d
    from orca.model import ORCAModel
    from orca.runs import git_info, machine_info
    from orca.train import resolve_device, seed_everything
    from rank_estimation.features import capture_block_features
    from rank_estimation.gaps import gap_profile, get_gap_metric

    device = resolve_device(args.device)
    seed_everything(args.seed)
    body = create_body(args.body, weights="none", img_size=args.img_size, **args.body_kwargs)
    patch = body.patch_embed
    dim, p = patch.proj.out_channels, patch.proj.kernel_size[0]
    src_embedder = ConvEmbedder2d(3, dim, img_size=args.img_size, patch_size=p)
    src_embedder.init_from_patch_embed(patch)
    tgt_embedder = ConvEmbedder2d(3, dim, img_size=args.img_size, patch_size=p)
    tgt_embedder.init_from_patch_embed(patch)
    body.patch_embed = torch.nn.Identity()
    model = ORCAModel(tgt_embedder, body, torch.nn.Identity()).to(device).eval().requires_grad_(False)
    src_embedder.to(device).eval().requires_grad_(False)
    blocks = [f"layers.{i}.blocks.{j}" for i, s in enumerate(body.layers) for j in range(len(s.blocks))]

    gen = torch.Generator().manual_seed(args.seed)
    if args.source == "fractal":
        from datasets.images import source_feature_set

        images, src_labels = source_feature_set("fractal", args.n, image_size=args.img_size, seed=args.seed,
                                                device=device)
        src_inputs = images
    else:
        src_inputs = random_images(args.n, args.img_size, args.batch_size, args.seed, device)
        src_labels = torch.randint(args.classes, (args.n,), generator=gen)
    tgt_labels = torch.randint(args.classes, (args.n,), generator=gen)
    tgt_inputs = smooth_fields(args.n, args.target_size, args.batch_size, args.seed + 1, device)

    capture = dict(layers=blocks, device=device, batch_size=args.batch_size, out_device=device)
    sync(device)
    t0 = time.perf_counter()
    src = capture_block_features(model, src_inputs, embedder=src_embedder, **capture)
    sync(device)
    t1 = time.perf_counter()
    tgt = capture_block_features(model, tgt_inputs, **capture)
    sync(device)
    t2 = time.perf_counter()

    labelled = "otdd" in args.metrics
    labels = {"source_labels": src_labels.to(device), "target_labels": tgt_labels.to(device)} if labelled else {}
    first = blocks[0]
    for name in args.metrics:  # warm-up, excluded from the timing
        kw = {**(labels if name == "otdd" else {}), **args.metric_kwargs.get(name, {})}
        get_gap_metric(name)(src[first], tgt[first], **kw)
    sync(device)
    t3 = time.perf_counter()
    profile = gap_profile(src, tgt, args.metrics, n_boot=args.n_boot, seed=args.seed, device=device,
                          metric_kwargs=args.metric_kwargs or None, **labels)
    sync(device)
    t4 = time.perf_counter()

    seconds = {m: float(s) for m, s in profile["seconds"].items()}
    total = t4 - t3
    record = {
        "bench": "stage2 gap profile",
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv]),
        "git": git_info(), "machine": machine_info(), "device": str(device),
        "settings": {"body": args.body, "body_kwargs": args.body_kwargs, "weights": "random (timm init)",
                     "img_size": args.img_size, "target_size": args.target_size, "n_source": args.n,
                     "n_target": args.n, "source": args.source, "blocks": len(blocks), "pool": "mean",
                     "metrics": args.metrics, "metric_kwargs": args.metric_kwargs, "n_boot": args.n_boot,
                     "batch_size": args.batch_size,
                     "amp": "bf16" if device.type == "cuda" else "off", "standardize": True,
                     "otdd_classes": int(torch.unique(src_labels).numel()) if labelled else None},
        "dims": {b: int(src[b].shape[1]) for b in blocks},
        "capture_s": {"source": t1 - t0, "target": t2 - t1},
        "seconds_per_metric": seconds,
        "gaps_total_s": total,
        "goal_s": GOAL_S,
        "meets_goal": bool(total < GOAL_S),
        "values": {b: {m: profile["values"][b][m]["value"] for m in args.metrics} for b in blocks},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage2.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "stage2.md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(rec: Dict[str, Any]) -> str:
    """The JSON record as a short markdown report (generated, never edited by hand)."""
    s, m, g = rec["settings"], rec["machine"], rec["git"]
    lines = [
        "# Stage 2 gap-profile benchmark", "",
        f"`{rec['command']}`", "",
        f"- machine: {m.get('gpu') or 'CPU'} ({rec['device']}), {m['cpus']} CPUs, torch {m['torch']}, host {m['host']}",
        f"- git: {g['commit']}{' (dirty)' if g['dirty'] else ''}",
        f"- body: {s['body']} {s['body_kwargs'] or ''} with {s['weights']} weights, {s['blocks']} blocks, "
        f"{s['img_size']} px, amp {s['amp']}",
        f"- samples: {s['n_source']} source ({s['source']}) + {s['n_target']} target ({s['target_size']}x"
        f"{s['target_size']} fields), token-mean features, standardised, n_boot={s['n_boot']}"
        + (f", metric options {s['metric_kwargs']}" if s["metric_kwargs"] else ""),
        f"- feature capture (not in the total): source {rec['capture_s']['source']:.2f} s, "
        f"target {rec['capture_s']['target']:.2f} s", "",
        "| metric | seconds (all blocks) | per block |", "|---|---:|---:|",
    ]
    for name, sec in rec["seconds_per_metric"].items():
        lines.append(f"| {name} | {sec:.2f} | {sec / s['blocks']:.3f} |")
    verdict = "meets" if rec["meets_goal"] else "misses"
    lines += [f"| **all** | **{rec['gaps_total_s']:.2f}** | {rec['gaps_total_s'] / s['blocks']:.3f} |", "",
              f"Goal: all metrics together under {rec['goal_s']:.0f} s on an H100; this run {verdict} it.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
