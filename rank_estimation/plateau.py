"""The pre-registered plateau rule: a recipe is long enough when its last 20% of epochs barely help.

Why a rule: every knee sweep's epoch count is fixed before the sweep by this test on one pilot run
(uniform r = 8, seed 0), so the knee results can never steer the recipe. A recipe stopped on the
rising part of its curve would measure how fast each rank learns, not how well it can fit.

The rule, on the validation curve v_1..v_E of the run's primary metric (lower is better: relative L2
for Darcy, error for the classification tasks): with c = E - ceil(0.2 E) epochs before the tail,

    improvement = (min_{e <= c} v_e - min_{e <= E} v_e) / min_{e <= c} v_e  <  2%.

Best-so-far values, not the last epoch's, because stage 3 keeps the best-by-validation checkpoint:
what the tail can change is the best value, and a noisy last epoch should not fail a flat curve.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

from orca.errors import FileReadError, UsageError, reading
from orca.runs import is_finished

TAIL = 0.2
TOLERANCE = 0.02
#: A tail of at least one epoch needs this many epochs.
MIN_EPOCHS = 5


@dataclass(frozen=True)
class Plateau:
    """The rule applied to one curve."""

    epochs: int
    head_epochs: int          # c: the epochs before the tail
    best_head: float          # min over epochs 1..c
    best: float               # min over all epochs
    improvement: float        # relative improvement the tail brought
    tolerance: float
    passed: bool

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def plateau(curve: Sequence[float], tail: float = TAIL, tolerance: float = TOLERANCE) -> Plateau:
    """Apply the rule to a validation curve (one value per epoch, lower is better)."""
    values = [float(v) for v in curve]
    if len(values) < MIN_EPOCHS:
        raise UsageError(f"a plateau needs at least {MIN_EPOCHS} epochs of validation, got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UsageError("the validation curve holds a negative or non-finite value")
    head = len(values) - math.ceil(tail * len(values))
    best_head, best = min(values[:head]), min(values)
    improvement = (best_head - best) / best_head if best_head > 0 else 0.0
    return Plateau(epochs=len(values), head_epochs=head, best_head=best_head, best=best,
                   improvement=improvement, tolerance=tolerance, passed=improvement < tolerance)


def run_curve(run_dir: Union[str, Path]) -> Tuple[str, List[float]]:
    """The primary metric's name and its per-epoch validation curve of a finished stage-3 run."""
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_path.is_file():
        raise UsageError(f"no finished run at {run_dir}", fix="give a stage-3 run directory that holds summary.json")
    with reading(summary_path, "the run summary", "rerun the pilot"):
        summary = json.loads(summary_path.read_text())
    if not is_finished(summary):
        raise UsageError(f"the pilot run has not finished, {run_dir}", fix="finish it (rerun its sweep) first")
    metric = summary["metric"]
    by_epoch: Dict[int, float] = {}
    with reading(metrics_path, "the run's metrics", "rerun the pilot"):
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "epoch" and f"val/{metric}" in record:
                by_epoch[int(record["epoch"])] = float(record[f"val/{metric}"])
    epochs = int(summary["epochs"])
    if sorted(by_epoch) != list(range(1, epochs + 1)):
        raise UsageError(f"{metrics_path} holds validation for {len(by_epoch)} of {epochs} epochs",
                         fix="validate every epoch (train.eval_every=1) and rerun the pilot")
    return metric, [by_epoch[e] for e in range(1, epochs + 1)]


#: The fields of a pilot verdict file (scripts/plateau_pilot.py --out) the report reads.
VERDICT_FIELDS = ("metric", "epochs", "head_epochs", "best_head", "best", "improvement", "tolerance", "passed", "curve")


def load_verdicts(pilots_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """The pilot verdicts directly under ``pilots_dir`` (``<knee table>[_level-L].json``), by name.

    Verdicts in subdirectories (superseded pilots) are not read: a task's recipe is the one its
    latest pilot judged. An absent directory gives no verdicts.
    """
    verdicts = []
    for path in sorted(Path(pilots_dir).glob("*.json")):
        with reading(path, "the pilot verdict", "rerun scripts/plateau_pilot.py on the pilot run"):
            data = json.loads(path.read_text())
        lacking = [k for k in VERDICT_FIELDS if k not in data] if isinstance(data, dict) else list(VERDICT_FIELDS)
        if lacking:
            raise FileReadError(f"the pilot verdict lacks {', '.join(lacking)}", str(path),
                                "rerun scripts/plateau_pilot.py on the pilot run with --out")
        verdicts.append({"key": path.stem, **{k: data[k] for k in VERDICT_FIELDS}})
    return verdicts
