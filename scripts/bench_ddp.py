"""Data-parallel scaling of training: img/s on N GPUs (DDP) against one GPU, at the same per-GPU batch.

    python scripts/bench_ddp.py                                  # all visible GPUs vs 1: full and LoRA r=8, batch 64, 256
    python scripts/bench_ddp.py --gpus 2 --methods full lora --batch-sizes 256
    python scripts/bench_ddp.py --smoke                          # CPU: 2 gloo processes, tiny Swin (tests)

Why a driver: a torchrun job cannot time itself at one GPU, so the two figures come from two
launches of scripts/bench_train.py on this machine, one after the other, with the same settings:
first plain on one GPU (no DDP wrapper: the baseline a user would otherwise run), then under
``torchrun --nproc_per_node=N`` (every rank at the same batch, gradients all-reduced by
DistributedDataParallel). Each writes its own ``train_ddp_1gpu`` / ``train_ddp_{N}gpu`` JSON and
markdown; this script joins them into ``train_ddp.json`` / ``.md``: per configuration and batch,
both img/s, the scaling (N-GPU / 1-GPU img/s) and the efficiency (scaling / N), with the commands
and the commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from orca.errors import exit_on_error

REPO = Path(__file__).resolve().parents[1]
BENCH = "scripts/bench_train.py"  # run from the repository root


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="processes of the DDP run (default: all visible GPUs)")
    p.add_argument("--methods", nargs="+", default=["full", "lora"], help="bench_train.py configurations")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256], help="per GPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny Swin, 2 processes over gloo (the tests)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = p.parse_args(argv)
    if args.gpus is None:
        if args.smoke:
            args.gpus = 2
        else:
            import torch

            args.gpus = torch.cuda.device_count()
    if args.gpus < 2:
        p.error(f"scaling needs at least 2 GPUs for the DDP run, got {args.gpus}"
                + ("" if args.smoke else " (torch.cuda.device_count(); pass --gpus N to choose)"))
    return args


def commands(args: argparse.Namespace) -> Dict[int, List[str]]:
    """World size -> the bench_train.py command that measures it."""
    common = ["--methods", *args.methods, "--out", str(args.out)]
    if args.smoke:
        common.append("--smoke")
    else:
        common += ["--batch-sizes", *map(str, args.batch_sizes), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.compile:
        common.append("--compile")
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    return {1: [sys.executable, BENCH, *common, "--tag", f"{stem(args)[5:]}_1gpu"],
            args.gpus: [*ddp, BENCH, *common, "--tag", f"{stem(args)[5:]}_{args.gpus}gpu"]}


def stem(args: argparse.Namespace) -> str:
    """The joined files' name; the two runs' are ``{stem}_1gpu`` and ``{stem}_{N}gpu``."""
    return "train_smoke_ddp" if args.smoke else "train_ddp"


def join(one: Dict[str, Any], many: Dict[str, Any], gpus: int) -> List[Dict[str, Any]]:
    """One row per configuration and batch that both runs measured."""
    base = {(r["config"], r["batch"]): r for r in one["results"] if r["status"] == "ok"}
    rows = []
    for r in many["results"]:
        ref = base.get((r["config"], r["batch"]))
        if r["status"] != "ok" or ref is None:
            rows.append({"config": r["config"], "batch": r["batch"], "status": r["status"] if r["status"] != "ok"
                         else "no 1-GPU figure"})
            continue
        scaling = r["img_per_s"] / ref["img_per_s"]
        rows.append({"config": r["config"], "batch": r["batch"], "status": "ok",
                     "img_per_s_1gpu": ref["img_per_s"], f"img_per_s_{gpus}gpu": r["img_per_s"],
                     "scaling": round(scaling, 3), "efficiency": round(scaling / gpus, 3),
                     "peak_gib_1gpu": ref["peak_gib"], f"peak_gib_{gpus}gpu": r["peak_gib"]})
    return rows


def write(rows: List[Dict[str, Any]], one: Dict[str, Any], many: Dict[str, Any], args: argparse.Namespace,
          cmds: Dict[int, List[str]]) -> Path:
    n = args.gpus
    meta = {"machine": many["machine"], "git": many["git"],
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "scripts/bench_ddp.py", *args.argv]),
            "runs": {str(k): " ".join(map(shlex.quote, v)) for k, v in cmds.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpus": n}
    name = stem(args)
    (args.out / f"{name}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    gpu = meta["machine"].get("gpu") or f"CPU, {meta['machine']['cpus']} cores"
    git = meta["git"]
    lines = [f"# Data-parallel scaling: {n} x {gpu} (DDP) against 1, same per-GPU batch", "",
             f"`{meta['command']}`", "",
             f"git {git['commit']}{' (dirty)' if git['dirty'] else ''}, {meta['date']}, "
             f"{'torch.compile' if args.compile else 'eager'}. The two runs, one after the other on this machine "
             f"(their own tables: `{name}_1gpu.md`, `{name}_{n}gpu.md`):", "",
             *[f"- {k} GPU{'s' if int(k) > 1 else ''}: `{v}`" for k, v in meta["runs"].items()], "",
             f"| batch per GPU | config | img/s, 1 GPU | img/s, {n} GPUs | scaling | efficiency | "
             f"peak GiB, 1 GPU | peak GiB, {n} GPUs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['config']} | {r['status']} | | | | | |")
            continue
        peak = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731 - no peak memory on CPU
        lines.append(f"| {r['batch']} | {r['config']} | {r['img_per_s_1gpu']:.1f} | {r[f'img_per_s_{n}gpu']:.1f} | "
                     f"{r['scaling']:.2f}x | {100 * r['efficiency']:.0f}% | {peak(r['peak_gib_1gpu'])} | "
                     f"{peak(r[f'peak_gib_{n}gpu'])} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return args.out / f"{name}.md"


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cmds = commands(args)
    for world, cmd in cmds.items():
        print(f"[bench_ddp] {world} GPU(s): {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"bench_ddp.py: the {world}-GPU run failed (exit {proc.returncode}); its output is above")
    one, many = (json.loads((args.out / f"{stem(args)}_{k}gpu.json").read_text()) for k in (1, args.gpus))
    path = write(join(one, many, args.gpus), one, many, args, cmds)
    print(path.read_text())
    return path


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
