"""A shared warm-up: every rank of a knee sweep starts from one trained embedder and head, then freezes them.

Why: a knee is meant to measure what the adapters add. When embedder and head train alongside the
adapters, a large head (Darcy's dense decoder has 1.58M parameters, several times the smallest
adapter budgets) does most of the work at every rank, and the error barely moves with the rank. The
recipe here separates the two: a warm-up run (``adapter.method=head``: embedder and head trained,
body frozen; it is the rank-0 point of the curve) is made once per task and seed; every adapter
run of that task and seed then loads the warm-up's embedder and head (``model.warmup_from=DIR``)
and keeps them frozen (``adapter.train_embedder=false adapter.train_head=false``), so the only thing
that differs between ranks is the adapters. A "small head" alternative would change the head's
architecture per task and still leave the embedder trainable; this keeps the models of every stage
as they are.

``DIR`` is either one warm-up run directory or a directory of them (a sweep table's output): then
the run is the one whose task (name and options) and seed equal this run's, so one setting serves
a whole sweep grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
import yaml

from orca.errors import OrcaError

#: The parts of the model a warm-up provides.
WARMUP_PARTS = ("embedder", "head")
#: The checkpoint of the warm-up run that is loaded (the weights it was tested with).
WARMUP_CHECKPOINT = Path("ckpt") / "best.pt"


def _read_config(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _matches(run_cfg: Dict[str, Any], task: Dict[str, Any], seed: int) -> bool:
    other = run_cfg.get("task") or {}
    return (other.get("name") == task.get("name") and (other.get("options") or {}) == (task.get("options") or {})
            and run_cfg.get("seed") == seed and (run_cfg.get("adapter") or {}).get("method") == "head")


def find_warmup_run(where: str, task: Dict[str, Any], seed: int) -> Path:
    """The warm-up run for this task and seed: ``where`` itself, or its one matching subdirectory.

    Args:
        where: ``model.warmup_from``.
        task: this run's ``task`` section as a plain dict (name, options).
        seed: this run's seed.
    Raises:
        OrcaError: no such directory, no matching finished warm-up, or several.
    """
    root = Path(where)
    key = "model.warmup_from"
    if not root.is_dir():
        raise OrcaError(f"no such directory {where!r}", key, "point it at a warm-up run (adapter.method=head) "
                        "or at the directory of a warm-up sweep")
    if (root / WARMUP_CHECKPOINT).is_file():
        cfg = _read_config(root)
        if not _matches(cfg, task, seed):
            raise OrcaError(f"{where} is not a head-only warm-up of task {task.get('name')!r} with these options "
                            f"and seed {seed}", key, "use the warm-up of this task and seed")
        return root
    found: List[Path] = sorted(d for d in root.iterdir() if d.is_dir() and (d / WARMUP_CHECKPOINT).is_file()
                               and _matches(_read_config(d), task, seed))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise OrcaError(f"{what} finished head-only warm-up runs of task {task.get('name')!r} with these options and "
                        f"seed {seed} under {where}", key, "run the warm-up sweep first (one run per task and seed)")
    return found[0]


def load_warmup(model: torch.nn.Module, where: str, task: Dict[str, Any], seed: int) -> Path:
    """Copy the warm-up run's embedder and head weights into ``model``; returns the run used.

    Raises:
        OrcaError: as :func:`find_warmup_run`, or shapes that do not fit this model.
    """
    run = find_warmup_run(where, task, seed)
    state = torch.load(run / WARMUP_CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    for part in WARMUP_PARTS:
        module = getattr(model, part)
        own = module.state_dict()
        theirs = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        bad = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
        if bad:
            raise OrcaError(f"the warm-up's {part} does not fit this model ({part}.{bad[0]})", "model.warmup_from",
                            "use a warm-up made with the same model and task settings")
        module.load_state_dict(theirs)
    return run
