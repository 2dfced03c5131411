"""``python -m orca <command>``: the one entry point the stage scripts call.

    python -m orca stage3 --config configs/darcy_tiny.yaml train.epochs=2
    python -m orca stage3 --resume runs/stage3__darcy__tiny__s0__20261123-120000
    python -m orca list tasks|adapters|objectives|gaps
    python -m orca show-config --config configs/darcy_swinb.yaml adapter.method=lora
    python -m orca data --config configs/darcy_swinb.yaml task.options.workers=16   # build/cache the data only
    python -m orca export runs/stage3__darcy__... --format peft|merged|adapter [--out DIR] [--checkpoint last]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

STAGES = {
    "stage0": ("orca.pretrain", "run_stage0"),
    "stage1": ("orca.align.loop", "run_stage1"),
    "stage2": ("rank_estimation.stage", "run_stage2"),
    "stage3": ("orca.train", "run_stage3"),
}


def _registries():
    from datasets.registry import TASKS
    from orca.adapters import ADAPTERS

    regs = {"tasks": TASKS, "adapters": ADAPTERS}
    try:
        from orca.align.objectives import OBJECTIVES
        from rank_estimation.gaps import GAP_METRICS

        regs.update({"objectives": OBJECTIVES, "gaps": GAP_METRICS})
    except ImportError:  # pragma: no cover - partial checkouts
        pass
    return regs


def export_main(argv: List[str]) -> int:
    """``python -m orca export RUN_DIR ...`` (orca/export.py)."""
    from orca.errors import OrcaError, error_line
    from orca.export import CHECKPOINTS, FORMATS, describe, export_run

    parser = argparse.ArgumentParser(prog="python -m orca export",
                                     description="Export a stage-3 run's weights (orca/export.py).")
    parser.add_argument("run_dir", help="a stage-3 run directory")
    parser.add_argument("--format", required=True, help=f"{' | '.join(FORMATS)}")
    parser.add_argument("--out", help="output directory (default RUN_DIR/export/FORMAT-CHECKPOINT)")
    parser.add_argument("--checkpoint", default="best", help=f"{' | '.join(CHECKPOINTS)} (default best: the tested weights)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.format, args.out, args.checkpoint)
    except OrcaError as err:
        print(error_line(err), file=sys.stderr)
        return err.exit_code
    print(f"[export] {args.format} export of {args.run_dir} ({args.checkpoint} checkpoint): {out} ({describe(out)})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m orca", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "list", "show-config", "data", "export"])
    parser.add_argument("what", nargs="*", help="for stages, data and show-config: dotted overrides (train.lr=3e-4); "
                                                 "for list: tasks | adapters | objectives | gaps")
    parser.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--resume", help="run directory to continue (its config.yaml is used)")
    args = parser.parse_intermixed_args(argv)

    if args.command == "list":
        regs = _registries()
        for name in args.what or sorted(regs):
            if name not in regs:
                parser.error(f"list: unknown registry {name!r}; choose from {', '.join(sorted(regs))}")
            print(f"{name}: {', '.join(regs[name].names())}")
        return 0

    from orca.config import load_config, save_config
    from orca.schema import ConfigError

    if args.resume and args.config:
        parser.error("--resume uses the run directory's config.yaml; do not pass --config too")
    try:  # a bad key or a missing file is the user's input: one clear line, no traceback
        if args.resume:
            cfg = load_config(str(Path(args.resume) / "config.yaml"), [*args.what, f"run_dir={args.resume}"])
        else:
            cfg = load_config(args.config, args.what)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        save_config(cfg, "/dev/stdout")
        return 0
    if args.command == "data":  # generate or check the task's data now (e.g. beside a GPU job), train nothing
        import json

        from datasets.registry import build_task

        task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
        sizes = {split: len(getattr(task, split)) for split in ("train", "val", "test")}
        print(json.dumps({"task": cfg.task.name, "sizes": sizes, "info": task.info}, default=str))
        return 0
    module_name, fn_name = STAGES[args.command]
    import importlib

    run = getattr(importlib.import_module(module_name), fn_name)(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"[{args.command}] outputs: {run.path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
