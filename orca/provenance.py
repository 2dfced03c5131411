"""What one stage's products must share with the stage that uses them, and the command that uses them.

Stage 1's aligned embedder (``model.embedder_from``) and stage 2's rank map (``adapter.rank_map``) are
only meaningful for the task, body and body weights they were made with, and a rank map also for the
target embedder its gaps were measured through. Each product records these facts (stage 1 in its
``summary.json``, stage 2 in ``rank_map.json``'s ``provenance``); the stages that read a product compare
them with their own before anything is written, and refuse a mismatch naming both sides. A product
without such a record (written by hand, or by an older version) is not checked.

Each stage also prints the exact command that continues with everything it made, since a next stage
that silently misses one product (e.g. stage 3 without the aligned embedder its rank map was measured
through) still runs, only on the wrong model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from orca.errors import UsageError


def target_embedder(model_cfg) -> str:
    """How the target inputs are embedded, as products record it: stage 1's run directory or the initial one."""
    return model_cfg.embedder_from or f"initial (model.embedder_init={model_cfg.embedder_init})"


def same_origin(there: Any, here: Any) -> bool:
    """Equal provenance entries; a file path (``file:PATH`` weights, an embedder run directory) also matches
    another spelling of the same existing path (relative in one run, absolute in the other)."""
    if there == here:
        return True
    if not (isinstance(there, str) and isinstance(here, str)) or there.startswith("file:") != here.startswith("file:"):
        return False
    a, b = (v[len("file:"):] if v.startswith("file:") else v for v in (there, here))
    return Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def differences(there: Mapping[str, Any], here: Mapping[str, Any]) -> List[str]:
    """``key 'a' there, 'b' here`` for every key of ``here`` whose value ``there`` does not share."""
    return [f"{k} {there.get(k)!r} there, {v!r} here" for k, v in here.items() if not same_origin(there.get(k), v)]


def facts(task: str, body: str, weights: str, seed: int) -> Dict[str, Any]:
    """What a product must share with its user. A randomly initialised body (``model.weights=none``) is a
    different body under another seed, so then the seed counts too."""
    out: Dict[str, Any] = {"task": task, "body": body, "weights": weights}
    if str(weights).startswith("none"):
        out["seed"] = seed
    return out


def check_embedder_from(cfg, weights: str) -> None:
    """Refuse ``model.embedder_from`` when it is not a stage-1 run of this task, body and weights.

    Args:
        cfg: the run's config.
        weights: this run's body weights (``body.orca_weights``).

    Raises:
        UsageError: a stage-1 run of another task / body / weights (seed, for a random body), naming both
            sides.
    """
    where = cfg.model.embedder_from
    if not where:
        return
    path = Path(where) / "summary.json"
    try:
        made = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no record to compare (a missing embedder file is reported when it is loaded)
    if not isinstance(made, dict):
        return
    key = f"model.embedder_from={where}"
    here = facts(cfg.task.name, cfg.model.body, weights, cfg.seed)
    differ = differences(made, here)
    if differ:
        raise UsageError(f"that embedder was aligned on another setup ({'; '.join(differ)})", key,
                         "use a stage-1 run of this task, body and weights, or run stage 1 for this one")


def read_rank_map_provenance(path: str | Path) -> Optional[Dict[str, Any]]:
    """``provenance`` of a stage-2 ``rank_map.json`` (None when there is none or the file cannot be read:
    the rank-map loader reports an unreadable file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    prov = data.get("provenance") if isinstance(data, dict) else None
    return prov if isinstance(prov, dict) else None


def check_rank_map(cfg, weights: str) -> None:
    """Refuse an ``adapter.rank_map`` file measured for another task, body, weights or target embedder.

    A rank map measured through stage 1's aligned embedder with ``model.embedder_from`` unset is refused
    too: stage 3 would train the unaligned embedder while the ranks describe the aligned one.

    Raises:
        UsageError: naming the rank map, the differing facts on both sides and the fix.
    """
    rank_map = cfg.adapter.rank_map
    if not isinstance(rank_map, (str, Path)):
        return
    prov = read_rank_map_provenance(rank_map)
    if prov is None:
        return
    key = f"adapter.rank_map={rank_map}"
    aligned = prov.get("target_embedder")
    if (isinstance(aligned, str) and not aligned.startswith("initial") and not cfg.model.embedder_from):
        raise UsageError(f"that rank map was measured through the aligned embedder of {aligned}, but "
                         f"model.embedder_from is not set, so stage 3 would train the unaligned one", key,
                         f"add model.embedder_from={aligned}")
    here = {**facts(cfg.task.name, cfg.model.body, weights, cfg.seed), "target_embedder": target_embedder(cfg.model)}
    if "seed" in here and "seed" not in prov:
        here.pop("seed")
    differ = differences(prov, here)
    if differ:
        raise UsageError(f"that rank map was measured on another setup ({'; '.join(differ)})", key,
                         "use a rank map of this task, body, weights and embedder, or run stage 2 for this one")


def next_command(stage: str, config: Path, overrides: List[str]) -> str:
    """``python -m orca STAGE --config RUN/config.yaml OVERRIDES run_dir=null``: the next stage with every
    setting of this run (its own config) plus the products it made."""
    return " ".join(["python -m orca", stage, "--config", str(config), *overrides, "run_dir=null"])
