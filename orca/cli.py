"""``python -m orca <command>``: the one entry point the stage scripts call.

    python -m orca stage3 --config configs/darcy_tiny.yaml train.epochs=2
    python -m orca stage3 --resume runs/stage3__darcy__tiny__s0__20261123-120000
    python -m orca list tasks|adapters|objectives|gaps
    python -m orca show-config --config configs/darcy_swinb.yaml adapter.method=lora
    python -m orca data --config configs/darcy_swinb.yaml task.options.workers=16   # build/cache the data only
    python -m orca sweep configs/experiments/table2_darcy_attn.yaml --dry-run   # a grid of stage-3 runs (orca.sweep)
    python -m orca slurm configs/experiments/ranks_patches.yaml --submit   # the sweep as a Slurm job array (orca.slurm)
    python -m orca export runs/stage3__darcy__... --format peft|merged|adapter [--out DIR] [--checkpoint last]

A mistake in the command, a config or an input file ends in one line ``error: <what>, <where>,
<what to do>`` (exit 2 for usage and config, 1 at run time); ``--debug`` or ORCA_DEBUG=1 adds the
traceback.

Why this is the one module that imports every stage: the stages import shared pieces below them
(``orca.runtime``, ``orca.optimization``, ``orca.evaluation``) and never each other, and stage 2
(``rank_estimation``) sits above orca core. Only here are they put side by side, and only here is
the full config schema (``CONFIG_SCHEMA``: orca core's sections plus stage 2's ``rank``) chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from datasets.registry import TASKS, build_task
from orca.adapters import ADAPTERS
from orca.align.loop import run_stage1
from orca.align.objectives import OBJECTIVES
from orca.config import load_config, save_config
from orca.errors import UsageError, exit_on_error
from orca.export import CHECKPOINTS, FORMATS, describe, export_run
from orca.pretrain import run_stage0
from orca.slurm import main as slurm_main
from orca.sweep import main as sweep_main
from orca.train import run_stage3
from rank_estimation.config import Stage2Config
from rank_estimation.gaps import GAP_METRICS
from rank_estimation.stage import run_stage2

#: Every stage's sections: orca core's schema with stage 2's ``rank`` on top.
CONFIG_SCHEMA = Stage2Config
STAGES = {"stage0": run_stage0, "stage1": run_stage1, "stage2": run_stage2, "stage3": run_stage3}
REGISTRIES = {"tasks": TASKS, "adapters": ADAPTERS, "objectives": OBJECTIVES, "gaps": GAP_METRICS}


def export_main(argv: List[str]) -> int:
    """``python -m orca export RUN_DIR ...`` (orca/export.py)."""
    parser = argparse.ArgumentParser(prog="python -m orca export",
                                     description="Export a stage-3 run's weights (orca/export.py).")
    parser.add_argument("run_dir", help="a stage-3 run directory")
    parser.add_argument("--format", required=True, help=f"{' | '.join(FORMATS)}")
    parser.add_argument("--out", help="output directory (default RUN_DIR/export/FORMAT-CHECKPOINT)")
    parser.add_argument("--checkpoint", default="best", help=f"{' | '.join(CHECKPOINTS)} (default best: the tested weights)")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.format, args.out, args.checkpoint, schema=CONFIG_SCHEMA)
    print(f"[export] {args.format} export of {args.run_dir} ({args.checkpoint} checkpoint): {out} ({describe(out)})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The ``orca`` command: :func:`run_command` with user failures as one ``error:`` line and exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # its own options (--gpus, --dry-run, ...): orca.sweep parses them
        return sweep_main(argv[1:], schema=CONFIG_SCHEMA, prog="python -m orca sweep")
    if argv[:1] == ["slurm"]:  # as sweep: orca.slurm parses its own options
        return slurm_main(argv[1:], schema=CONFIG_SCHEMA)
    return exit_on_error(run_command, argv)


def run_command(argv: List[str]) -> int:
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m orca", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "list", "show-config", "data", "sweep", "slurm", "export"])
    parser.add_argument("what", nargs="*", help="for stages, data and show-config: dotted overrides (train.lr=3e-4); "
                                                 "for list: tasks | adapters | objectives | gaps")
    parser.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--resume", help="run directory to continue (its config.yaml is used)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error too (or set ORCA_DEBUG=1)")
    args = parser.parse_intermixed_args(argv)

    if args.command == "list":
        for name in args.what or sorted(REGISTRIES):
            if name not in REGISTRIES:
                parser.error(f"list: unknown registry {name!r}; choose from {', '.join(sorted(REGISTRIES))}")
            print(f"{name}: {', '.join(REGISTRIES[name].names())}")
        return 0

    if args.resume and args.config:
        parser.error("--resume uses the run directory's config.yaml; do not pass --config too")
    if args.resume:
        if not (Path(args.resume) / "config.yaml").is_file():
            raise UsageError("--resume needs a run directory holding config.yaml", args.resume,
                             "pass a directory under runs/ that a stage created")
        cfg = load_config(str(Path(args.resume) / "config.yaml"), [*args.what, f"run_dir={args.resume}"],
                          schema=CONFIG_SCHEMA)
    else:
        cfg = load_config(args.config, args.what, schema=CONFIG_SCHEMA)
    if args.command == "show-config":
        save_config(cfg, "/dev/stdout")
        return 0
    if args.command == "data":  # generate or check the task's data now (e.g. beside a GPU job), train nothing
        task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
        sizes = {split: len(getattr(task, split)) for split in ("train", "val", "test")}
        print(json.dumps({"task": cfg.task.name, "sizes": sizes, "info": task.info}, default=str))
        return 0
    run = STAGES[args.command](cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"[{args.command}] outputs: {run.path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
