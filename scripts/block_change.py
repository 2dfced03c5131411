"""How far each Swin block moves the residual stream on a task's inputs, before any training.

    python scripts/block_change.py                             # Darcy-85, fractal vs random body
    python scripts/block_change.py --task natural_patches
    python scripts/block_change.py --n 8 --out /tmp/bc task.options.n_train=8   # overrides go last

Why: under LoRA r = 8 a random body beats the fractal-pretrained one on Darcy-85, while the fractal
body is the better start for full fine-tuning and the better frozen feature map
(``results/tables.md``, "body_evidence_darcy*"). One reading: a randomly initialised block (weights
of std 0.02 on a residual stream) changes its input little, so a random body starts close to the
identity and low-rank updates build the task's map almost freely, while a pretrained body's blocks
transform their inputs strongly and LoRA has to bend them. This script measures the first half of
that reading: for every block, ``||block(x) - x|| / ||x||`` over the tokens of each sample (x the
block's input), averaged over samples, for each body on the same inputs through the same (freshly
initialised, seed-fixed) embedder. It says nothing about training dynamics.

The model is built from an experiment config (default ``configs/body_fractal.yaml``) as stage 3 builds
it (``orca.model.build_model``), once per ``model.weights`` value; the inputs are the first ``--n``
training samples of ``--task``
(Darcy-85 is generated if it is not cached: pass small ``task.options`` to keep that short on a
CPU). Writes ``{out}/block_change.json`` and ``{out}/block_change.md`` (default ``results/``) with
the machine, the git commit and the exact command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]

from datasets.registry import build_task
from orca.config import load_config
from orca.errors import exit_on_error
from orca.model import build_model
from orca.runs import git_info, machine_info


def block_changes(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """``{block name: mean over samples of ||out - in|| / ||in||}`` for every block of the body."""
    changes: Dict[str, float] = {}
    hooks = []
    for name, block in model.body.named_modules():
        if type(block).__name__ != "SwinTransformerBlock":
            continue

        def hook(module, inputs, output, name=name):
            inp = inputs[0].flatten(1).float()
            out = output.flatten(1).float()
            changes[name] = ((out - inp).norm(dim=1) / inp.norm(dim=1)).mean().item()

        hooks.append(block.register_forward_hook(hook))
    if not hooks:
        raise ValueError(f"no SwinTransformerBlock in body {type(model.body).__name__}: this script reads timm Swin bodies")
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return changes


def main(argv: List[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/body_fractal.yaml"))
    p.add_argument("--task", default="darcy", help="registered task whose training inputs are measured")
    p.add_argument("--weights", nargs="+", default=["file", "none"], help="model.weights values to compare")
    p.add_argument("--n", type=int, default=32, help="training samples to measure on")
    p.add_argument("--out", type=Path, default=REPO / "results")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. task.options.n_train=32")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    rows: Dict[str, Dict[str, float]] = {}
    for weights in args.weights:
        cfg = load_config(args.config, [f"task.name={args.task}", *args.overrides, f"model.weights={weights}"])
        task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
        n = min(args.n, len(task.train))
        x = torch.stack([task.train[i][0] for i in range(n)])
        torch.manual_seed(cfg.seed)  # the same embedder and head for every body
        model = build_model(cfg.model, task).eval()
        rows[weights] = block_changes(model, x)
        print(f"[block_change] weights={weights}: " +
              " ".join(f"{v:.3f}" for v in rows[weights].values()), flush=True)
    blocks = list(next(iter(rows.values())))
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/block_change.py", *(argv if argv is not None else sys.argv[1:])])
    out = {"command": command, "git": git_info(), "machine": machine_info(), "config": args.config,
           "overrides": args.overrides, "n": n, "task": cfg.task.name, "body": cfg.model.body,
           "block_change": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_change.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# How far each block moves the residual stream at initialisation", "",
             f"`{command}`", "",
             f"git {out['git']['commit']}{' (dirty)' if out['git'].get('dirty') else ''}, "
             f"{out['machine']['platform']}, torch {out['machine']['torch']}; task {cfg.task.name}, "
             f"{n} training samples through the same seed-{cfg.seed} embedder; body {cfg.model.body}. "
             "Each cell: ||block(x) - x|| / ||x|| per sample (x the block's input tokens), mean over samples.", "",
             "| block | " + " | ".join(f"model.weights={w}" for w in rows) + " |",
             "|---|" + "---|" * len(rows)]
    lines += [f"| {b} | " + " | ".join(f"{rows[w][b]:.3f}" for w in rows) + " |" for b in blocks]
    lines += ["| mean | " + " | ".join(f"{sum(rows[w].values()) / len(blocks):.3f}" for w in rows) + " |", ""]
    md = args.out / "block_change.md"
    md.write_text("\n".join(lines))
    print(f"wrote {md}")
    return md


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
