"""Calibrate the candidate gap metrics on the gap dial and the large-gap tasks, and pick the primary.

    python scripts/calibrate_gaps.py                      # -> results/calibration/gap_calibration.{md,json}
    python scripts/calibrate_gaps.py --n-source 128 --n-target 64 --n-boot 100 --threads 1 --out results/calibration

Body: configs/body_fractal.yaml (the committed fractal Swin). Source stream: ``--n-source`` training
images of the pretraining classes the dial uses (``fractal``, classes [0, 100)) through the body's
own patch embedding. Target streams, each through the model's initial target embedder: the same
``--n-target`` dial images at every level (fresh instances of those classes, scrambled per level),
and ``--n-target`` training inputs each of Darcy (a small 85 x 85 solver grid: only the input
coefficient fields enter the features), tones and digits. Features are block outputs, token-averaged
(stage 2's default ``pool=mean``).

Every candidate of ``rank_estimation.calibration.CANDIDATES`` is measured at every block of every
set with a joint bootstrap over images, and the rule ``SELECTION_RULE`` (printed in the report,
committed before this script first ran) picks the primary metric. The output records the command,
the commit and the machine. CPU sized: about 0.4 s per 224 px forward pass and 3 s per bootstrap replicate on one
core of a busy 2-core machine, where one thread beats two (the many small kernel matrices of the
bootstrap only wait on each other's threads).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from datasets.fractal_dial import DIAL_LEVELS, FractalDialOptions
from datasets.images import source_feature_set
from datasets.registry import build_task, get_task
from orca.cli import CONFIG_SCHEMA
from orca.config import load_config
from orca.errors import exit_on_error
from orca.model import build_model, source_embedder
from orca.runs import git_info, machine_info, write_json
from orca.runtime import fetch_inputs
from rank_estimation.calibration import (
    CANDIDATES, SATURATION_LIMIT, SELECTION_RULE, evaluate, joint_bootstrap, saturation, select_primary,
)
from rank_estimation.features import EMBED, capture_block_features

BODY_CONFIG = "configs/body_fractal.yaml"
DIAL_CLASSES = 100
TASKS = {  # the large-gap tasks and the options that keep them CPU sized
    "darcy": {"resolution": 85, "subsample": 1, "n_val": 2, "n_test": 2},
    "tones": {},
    "digits": {},
}


def dial_name(level: int) -> str:
    return f"dial{level}"


def features(model, inputs: torch.Tensor, embedder=None) -> Dict[str, torch.Tensor]:
    return capture_block_features(model, inputs, embedder=embedder, pool="mean", device="cpu", batch_size=16,
                                  amp="off")


def collect(args) -> tuple:
    """Source features and every target set's features (block outputs), with timings."""
    cfg = load_config(BODY_CONFIG, schema=CONFIG_SCHEMA)
    times: Dict[str, float] = {}
    t = time.time()
    src_x, src_y = source_feature_set("fractal", args.n_source, image_size=cfg.model.img_size, seed=args.seed,
                                      options={"num_classes": DIAL_CLASSES})
    base = build_task("fractal_dial", FractalDialOptions(level=0, num_classes=DIAL_CLASSES, train_per_class=1,
                                                         val_per_class=1, test_per_class=1), args.data_root)
    idx = np.sort(np.random.default_rng(args.seed).choice(len(base.train), args.n_target, replace=False)).tolist()
    dial_x, _ = base.train.get_batch(idx)
    times["render_s"] = time.time() - t

    t = time.time()
    model = build_model(cfg.model, base).eval().requires_grad_(False)
    src = features(model, src_x, embedder=source_embedder(cfg.model).eval())
    sets: Dict[str, Dict[str, torch.Tensor]] = {}
    for level in range(DIAL_LEVELS):
        scramble = FractalDialOptions(level=level, num_classes=DIAL_CLASSES).scramble()
        sets[dial_name(level)] = features(model, scramble(dial_x))
        print(f"[calibrate] dial level {level}: {time.time() - t:.0f}s", flush=True)
    times["dial_features_s"] = time.time() - t
    for name, opts in TASKS.items():
        t = time.time()
        entry = get_task(name)
        task = build_task(name, entry.options(**{**opts, **({"n_train": args.n_target} if name == "darcy" else {})}),
                          args.data_root)
        pos = np.sort(np.random.default_rng(args.seed).choice(len(task.train), args.n_target, replace=False))
        x = fetch_inputs(task.train, pos.tolist(), args.seed)
        model = build_model(cfg.model, task).eval().requires_grad_(False)
        sets[name] = features(model, x)
        times[f"{name}_s"] = time.time() - t
        print(f"[calibrate] {name}: {times[f'{name}_s']:.0f}s", flush=True)
    return src, sets, times, int(torch.unique(src_y).numel())


def fmt(v: Optional[float], digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def report(out: Dict[str, Any]) -> str:
    dial = [dial_name(level) for level in range(DIAL_LEVELS)]
    lines = ["# Gap metric calibration", "",
             f"Command: `{out['command']}`  ", f"Commit: {out['git']['commit']} (dirty: {out['git']['dirty']})  ",
             f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, torch {out['machine']['torch']} "
             f"(shared with other jobs; wall time {out['wall_s']:.0f} s)  ",
             f"Samples: {out['n_source']} source images ({out['source_classes']} classes), {out['n_target']} images per "
             f"target set, {out['n_boot']} bootstrap replicates, gap = mean over {len(out['blocks'])} blocks", "",
             "## Rule", "", SELECTION_RULE, "",
             "## Outcome", "", f"Primary metric: **{out['selection']['primary']}** ({out['selection']['clause']}).", ""]
    lines += ["| metric | dial rises | tasks resolved | saturated | passes | task order (small -> large) |",
              "|---|---|---|---|---|---|"]
    for m in CANDIDATES:
        e = out["evaluations"][m]
        lines.append(f"| {m} | {e['rises']} | {e['resolved']} | {', '.join(e['saturated']) or 'no'} | "
                     f"{e['passes']} | {' < '.join(e['task_order'])} |")
    for m in CANDIDATES:
        r, e = out["results"][m], out["evaluations"][m]
        lines += ["", f"## {m}", "", "| set | gap | 95% CI | saturation |", "|---|---|---|---|"]
        for name in dial + list(TASKS):
            s = r["sets"][name]
            lines.append(f"| {name} | {fmt(s['value'])} | [{fmt(s['lo'])}, {fmt(s['hi'])}] | "
                         f"{fmt(e['saturation'].get(name), 3)} |")
        lines += ["", "Adjacent dial steps (paired): " + "; ".join(
            f"{s['b']}->{s['a']} {fmt(s['value'], 3)} [{fmt(s['lo'], 3)}, {fmt(s['hi'], 3)}]" for s in e["steps"]),
            "", "Task differences: " + "; ".join(
            f"{p['a']}-{p['b']} {fmt(p['value'], 3)} [{fmt(p['lo'], 3)}, {fmt(p['hi'], 3)}]" for p in e["pairs"])]
        if e["reasons"]:
            lines += ["", "Fails: " + "; ".join(e["reasons"]) + "."]
    lines += ["", f"Saturation is MMD^2 / (K_ss + K_tt), averaged over blocks; the limit is {SATURATION_LIMIT}.",
              "Per-block values are in gap_calibration.json.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-source", type=int, default=128)
    p.add_argument("--n-target", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", type=Path, default=Path("results/calibration"))
    args = p.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    src, sets, times, source_classes = collect(args)
    blocks = [layer for layer in src if layer != EMBED]
    groups = {name: ("dial" if name.startswith("dial") else name) for name in sets}
    dial = [dial_name(level) for level in range(DIAL_LEVELS)]
    results, evaluations = {}, {}
    for m in CANDIDATES:
        t = time.time()
        results[m] = joint_bootstrap(m, src, sets, blocks, groups, n_boot=args.n_boot, seed=args.seed)
        sats = {name: saturation(m, src, sets[name], blocks) for name in sets}
        evaluations[m] = evaluate(results[m], dial, list(TASKS), {t_: sats[t_] for t_ in TASKS})
        evaluations[m]["saturation"] = sats
        times[f"bootstrap_{m}_s"] = time.time() - t
        print(f"[calibrate] {m}: passes={evaluations[m]['passes']} ({times[f'bootstrap_{m}_s']:.0f}s)", flush=True)
    out = {
        "command": "python " + " ".join(["scripts/calibrate_gaps.py", *(argv if argv is not None else sys.argv[1:])]),
        "git": git_info(), "machine": machine_info(), "wall_s": time.time() - t0, "timing_s": times,
        "n_source": args.n_source, "source_classes": source_classes, "n_target": args.n_target, "n_boot": args.n_boot,
        "seed": args.seed, "blocks": blocks, "dial_levels": DIAL_LEVELS, "tasks": {k: v for k, v in TASKS.items()},
        "rule": SELECTION_RULE, "selection": select_primary(evaluations),
        "results": {m: {k: v for k, v in r.items() if k != "replicates"} for m, r in results.items()},
        "evaluations": evaluations,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gap_calibration.json", out)
    (args.out / "gap_calibration.md").write_text(report(out))
    print(f"[calibrate] primary: {out['selection']['primary']} ({out['selection']['clause']}); "
          f"wrote {args.out}/gap_calibration.{{md,json}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
