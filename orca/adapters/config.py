"""The one configuration schema every stage-3 fine-tuning method reads.

Why a single flat dataclass rather than one config class per method (as peft has): a stage-3 run
sweeps methods with everything else held fixed, so one YAML block must be able to switch
``method: lora`` to ``method: dylora`` without reshaping the file. Fields that a method does not use
are ignored by it. All cross-field checks live in ``__post_init__`` and raise ``ValueError`` naming
the field, the value and what is allowed (never a bare ``assert``: those vanish under ``python -O``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from orca.adapters.registries import ADAPTERS, INIT_SCHEMES, RANK_DISTRIBUTIONS
from orca.adapters.targets import RENAMED_PRESETS, TARGET_PRESETS, check_preset
from orca.errors import UsageError, reading
from orca.schema import from_dict

#: LoRA+ (Hayou et al. 2024, Sec. 4) recommends lr_B / lr_A around 2^4 for most tasks.
LORAPLUS_DEFAULT_RATIO = 16.0

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass
class AdapterConfig:
    """Stage-3 fine-tuning method and its hyperparameters (the methods table in the README)."""

    method: str = field(default="lora", metadata=_help(
        "Fine-tuning method: full | head | lora | delta_lora | dylora | qlora | adalora (peft baseline)."))
    rank: int = field(default=8, metadata=_help(
        "Uniform LoRA rank r for every targeted Linear (overridden per module by rank_map)."))
    alpha: float = field(default=16.0, metadata=_help(
        "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."))
    rslora: bool = field(default=False, metadata=_help(
        "rsLoRA scaling alpha/sqrt(r) (Kalajdzievski 2023): keeps the update's scale stable "
        "across ranks, which matters when comparing ranks as this project does."))
    init_a: str = field(default="kaiming", metadata=_help(
        "Initialisation of A: kaiming (uniform, as nn.Linear / the LoRA reference code) | gaussian."))
    dropout: float = field(default=0.0, metadata=_help(
        "Dropout on the LoRA path input; 0 adds no dropout op at all."))
    targets: Union[str, List[str]] = field(default="attn", metadata=_help(
        "Which body Linears get LoRA: a preset of orca.adapters.targets (attn | blocks | all, the "
        "names stage 2's rank.targets takes) or a list of regexes (re.fullmatch on module names "
        "relative to the body)."))
    rank_map: Optional[Union[str, Dict[str, int]]] = field(default=None, metadata=_help(
        "Per-module ranks: path to stage 2's JSON ({'rank_map': {name_or_regex: r}, ...}) or the "
        "mapping itself. Keys are exact module names (a Linear, or a block: applies to its "
        "targeted Linears) or regexes; 0 = not adapted. Unnamed targets keep `rank`."))
    clip_rank: bool = field(default=False, metadata=_help(
        "A rank above a Linear's min(d_in, d_out) becomes that full rank instead of an error: the "
        "seed's large uniform ranks (128, 256) on a body narrower than Swin-B. The run's summary "
        "counts the parameters of the ranks actually used."))
    train_embedder: bool = field(default=True, metadata=_help("Train the target embedder."))
    train_head: bool = field(default=True, metadata=_help("Train the task head."))
    train_norms: bool = field(default=False, metadata=_help(
        "Also train the body's LayerNorm weights and biases (not used by full, which trains all)."))
    loraplus_ratio: Optional[float] = field(default=None, metadata=_help(
        "LoRA+ (Hayou et al. 2024): lr_B = ratio * lr_A. None disables; true means 16."))
    delta_lora_start: int = field(default=500, metadata=_help(
        "Delta-LoRA K: W starts following the LoRA update once the (0-based) step t > K."))
    delta_lora_lambda: float = field(default=2.0, metadata={**_help(
        "Delta-LoRA lambda: W <- W + lambda * s * (B'A' - BA) after each optimizer step."), "min": 0})
    dylora_r_min: int = field(default=1, metadata=_help("DyLoRA smallest sampled rank b."))
    dylora_r_max: Optional[int] = field(default=None, metadata=_help(
        "DyLoRA largest rank (the size of A and B); None = rank."))
    dylora_dist: str = field(default="uniform", metadata=_help(
        "DyLoRA distribution of b over [r_min, r_max]: uniform | linear (p(b) ~ b)."))
    dylora_frozen: bool = field(default=False, metadata=_help(
        "DyLoRA 'frozen' variant: each step updates only component b."))
    dylora_eval_rank: Optional[int] = field(default=None, metadata=_help(
        "Rank b used for evaluation; None = r_max."))
    qlora_compute_dtype: str = field(default="bfloat16", metadata=_help(
        "QLoRA compute dtype of the NF4 matmul: bfloat16 | float16 | float32."))
    qlora_double_quant: bool = field(default=True, metadata=_help(
        "QLoRA double quantisation of the NF4 block scales (8-bit, block 256)."))
    adalora_init_rank: Optional[int] = field(default=None, metadata=_help(
        "AdaLoRA initial rank per module (it prunes down to `rank` on average); None = ceil(1.5 rank), "
        "peft's 12 -> 8 ratio."))
    adalora_orth_reg_weight: float = field(default=0.5, metadata=_help(
        "AdaLoRA orthogonality penalty weight on ||AA^T - I|| and ||B^TB - I|| (peft's default)."))
    adalora_tinit: float = field(default=0.1, metadata=_help(
        "AdaLoRA warm-up before any pruning, as a fraction of the run's optimizer steps."))
    adalora_tfinal: float = field(default=0.2, metadata=_help(
        "AdaLoRA final phase with the rank pattern fixed, as a fraction of the run's optimizer steps."))
    adalora_total_step: Optional[int] = field(default=None, metadata=_help(
        "AdaLoRA run length in optimizer steps (train.epochs x steps per epoch) for its budget "
        "schedule; None = set by the training loop through method.set_total_steps."))

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        _choice("method", self.method, ADAPTERS.names())
        _int("rank", self.rank, low=1)
        _number("alpha", self.alpha, positive=True)
        _bool("rslora", self.rslora)
        _choice("init_a", self.init_a, INIT_SCHEMES.names())
        _number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        self._check_targets()
        if isinstance(self.rank_map, dict):
            check_rank_values(self.rank_map, source="rank_map")
        elif self.rank_map is not None and not isinstance(self.rank_map, (str, Path)):
            raise ValueError(f"rank_map={self.rank_map!r}: must be None, a JSON path or a dict")
        for name in ("clip_rank", "train_embedder", "train_head", "train_norms", "dylora_frozen",
                     "qlora_double_quant"):
            _bool(name, getattr(self, name))
        if self.loraplus_ratio is True:  # bool is an int: without this, True would mean ratio 1
            self.loraplus_ratio = LORAPLUS_DEFAULT_RATIO
        elif self.loraplus_ratio is False:
            self.loraplus_ratio = None
        if self.loraplus_ratio is not None:
            _number("loraplus_ratio", self.loraplus_ratio, positive=True)
        _int("delta_lora_start", self.delta_lora_start, low=0)
        _number("delta_lora_lambda", self.delta_lora_lambda)
        _int("dylora_r_min", self.dylora_r_min, low=1)
        if self.dylora_r_max is not None:
            _int("dylora_r_max", self.dylora_r_max, low=1)
        if self.dylora_r_min > self.r_max:
            raise ValueError(
                f"dylora_r_min={self.dylora_r_min} > dylora_r_max={self.r_max}"
                f"{'' if self.dylora_r_max is not None else ' (= rank)'}: DyLoRA needs r_min <= r_max")
        _choice("dylora_dist", self.dylora_dist, RANK_DISTRIBUTIONS.names())
        if self.dylora_eval_rank is not None:
            _int("dylora_eval_rank", self.dylora_eval_rank, low=1)
            if not self.dylora_r_min <= self.dylora_eval_rank <= self.r_max:
                raise ValueError(
                    f"dylora_eval_rank={self.dylora_eval_rank}: must lie in "
                    f"[dylora_r_min, dylora_r_max] = [{self.dylora_r_min}, {self.r_max}]")
        _choice("qlora_compute_dtype", self.qlora_compute_dtype, COMPUTE_DTYPES)
        if self.adalora_init_rank is not None:  # >= rank only matters when AdaLoRA runs (it only prunes)
            _int("adalora_init_rank", self.adalora_init_rank, low=self.rank if self.method == "adalora" else 1)
        _number("adalora_orth_reg_weight", self.adalora_orth_reg_weight)
        if self.adalora_orth_reg_weight < 0:
            raise ValueError(f"adalora_orth_reg_weight={self.adalora_orth_reg_weight!r}: must be >= 0")
        for name in ("adalora_tinit", "adalora_tfinal"):
            _number(name, getattr(self, name))
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a fraction in [0, 1)")
        if self.adalora_tinit + self.adalora_tfinal >= 1.0:
            raise ValueError(f"adalora_tinit + adalora_tfinal = {self.adalora_tinit + self.adalora_tfinal:g}: "
                             "must be < 1, or no step is left for AdaLoRA's budget allocation")
        if self.adalora_total_step is not None:
            _int("adalora_total_step", self.adalora_total_step, low=1)

    def _check_targets(self) -> None:
        if isinstance(self.targets, str):
            if self.targets not in TARGET_PRESETS and self.targets not in RENAMED_PRESETS:
                _choice("targets", self.targets, list(TARGET_PRESETS), extra="or a list of regexes")
            check_preset("adapter.targets", self.targets)
            return
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"targets={self.targets!r}: must be one of {sorted(TARGET_PRESETS)} "
                             "or a non-empty list of regexes")
        for pattern in self.targets:
            if not isinstance(pattern, str):
                raise ValueError(f"targets entry {pattern!r}: must be a string regex")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"targets entry {pattern!r} is not a valid regex: {err}") from None
        self.targets = list(self.targets)

    # ------------------------------------------------------------------ derived values
    @property
    def r_max(self) -> int:
        """DyLoRA's largest rank (the allocated size of A and B)."""
        return self.dylora_r_max if self.dylora_r_max is not None else self.rank

    def target_patterns(self) -> List[str]:
        """Regexes (``re.fullmatch`` on body-relative names) selected by ``targets``."""
        if isinstance(self.targets, str):
            return list(TARGET_PRESETS[self.targets])
        return list(self.targets)

    def load_rank_map(self) -> Optional[Dict[str, int]]:
        """The rank map as a dict (read from JSON when ``rank_map`` is a path), or None."""
        if self.rank_map is None:
            return None
        if isinstance(self.rank_map, dict):
            return dict(self.rank_map)
        path = Path(self.rank_map)
        if not path.is_file():
            raise UsageError("adapter.rank_map: no such file", str(path), "give the rank_map.json a stage-2 run wrote")
        with reading(path, "the rank map", "give the rank_map.json a stage-2 run wrote, unedited"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("rank_map"), dict):
                raise ValueError("expected a JSON object with a 'rank_map' object {module_name_or_regex: rank}")
            return check_rank_values(data["rank_map"], source="rank_map")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AdapterConfig":
        """Build from a plain dict; unknown keys are errors naming the nearest key (a typo must not silently default)."""
        return from_dict(cls, data, "adapter")


def check_rank_values(rank_map: Dict[str, Any], source: str) -> Dict[str, int]:
    """Validate ``{name_or_regex: rank}``: string keys, integer ranks >= 0 (0 = not adapted)."""
    out: Dict[str, int] = {}
    for key, value in rank_map.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{source}: key {key!r} must be a non-empty module name or regex")
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value)):
            raise ValueError(f"{source}: rank for {key!r} is {value!r}; must be an integer >= 0")
        if value < 0:
            raise ValueError(f"{source}: rank for {key!r} is {value}; must be >= 0 (0 = not adapted)")
        out[key] = int(value)
    return out


def _choice(name: str, value: Any, allowed, extra: str = "") -> None:
    if value not in allowed:
        more = f" {extra}" if extra else ""
        close = difflib.get_close_matches(str(value), list(allowed), n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{name}={value!r}: allowed values are {sorted(allowed)}{more}{hint}")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    if positive and value <= 0:
        raise ValueError(f"{name}={value!r}: must be > 0")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true or false")
