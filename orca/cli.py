"""``python -m orca <command>``: the one entry point the stage scripts call.

    python -m orca stage3 --config configs/darcy_tiny.yaml train.epochs=2
    python -m orca stage3 --resume runs/stage3__darcy__tiny__s0__20261123-120000
    python -m orca list tasks|adapters|objectives|gaps
    python -m orca show-config --config configs/darcy_swinb.yaml adapter.method=lora
    python -m orca data --config configs/darcy_swinb.yaml task.options.workers=16   # build/cache the data only
    python -m orca export runs/stage3__darcy__... --format peft|merged|adapter [--out DIR] [--checkpoint last]

A mistake in the command, a config or an input file ends in one line ``error: <what>, <where>,
<what to do>`` (exit 2 for usage and config, 1 at run time); ``--debug`` or ORCA_DEBUG=1 adds the
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from orca.errors import UsageError, exit_on_error

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
    from orca.export import CHECKPOINTS, FORMATS, describe, export_run

    parser = argparse.ArgumentParser(prog="python -m orca export",
                                     description="Export a stage-3 run's weights (orca/export.py).")
    parser.add_argument("run_dir", help="a stage-3 run directory")
    parser.add_argument("--format", required=True, help=f"{' | '.join(FORMATS)}")
    parser.add_argument("--out", help="output directory (default RUN_DIR/export/FORMAT-CHECKPOINT)")
    parser.add_argument("--checkpoint", default="best", help=f"{' | '.join(CHECKPOINTS)} (default best: the tested weights)")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.format, args.out, args.checkpoint)
    print(f"[export] {args.format} export of {args.run_dir} ({args.checkpoint} checkpoint): {out} ({describe(out)})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The ``orca`` command: :func:`run_command` with user failures as one ``error:`` line and exit status."""
    return exit_on_error(run_command, argv)


def run_command(argv: List[str]) -> int:
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m orca", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "list", "show-config", "data", "export"])
    parser.add_argument("what", nargs="*", help="for stages, data and show-config: dotted overrides (train.lr=3e-4); "
                                                 "for list: tasks | adapters | objectives | gaps")
    parser.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--resume", help="run directory to continue (its config.yaml is used)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error too (or set ORCA_DEBUG=1)")
    args = parser.parse_intermixed_args(argv)

    if args.command == "list":
        regs = _registries()
        for name in args.what or sorted(regs):
            if name not in regs:
                parser.error(f"list: unknown registry {name!r}; choose from {', '.join(sorted(regs))}")
            print(f"{name}: {', '.join(regs[name].names())}")
        return 0

    from orca.config import load_config, save_config

    if args.resume and args.config:
        parser.error("--resume uses the run directory's config.yaml; do not pass --config too")
    if args.resume:
        if not (Path(args.resume) / "config.yaml").is_file():
            raise UsageError("--resume needs a run directory holding config.yaml", args.resume,
                             "pass a directory under runs/ that a stage created")
        cfg = load_config(str(Path(args.resume) / "config.yaml"), [*args.what, f"run_dir={args.resume}"])
    else:
        cfg = load_config(args.config, args.what)
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
