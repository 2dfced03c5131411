"""Target presets: which Linears of the Swin body a preset name selects, in every stage.

Why one table: stage 2 spends a parameter budget over the modules of ``rank.targets`` and stage 3
adapts the modules of ``adapter.targets``; an equal-budget comparison between a stage-2 rank map and
a uniform rank holds only if one name means one module set in both. Module names are relative to
the timm Swin body and matched with ``re.fullmatch``.

``attn`` is what seed 001 adapts (its Table 2 parameter counts are 72,192 x r on Swin-B, exactly
qkv + proj of every block). LoRA (Hu et al. 2021, Sec. 7.1) found adapting more weight types beats a
larger rank on fewer, hence ``blocks`` (qkv, proj, fc1, fc2 of every block: 96 Linears on Swin-B)
and ``all``: every Linear of the body, which adds the three patch-merging reductions that sit
between stages (99 on Swin-B).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from torch import nn

from orca.schema import ConfigError

#: The four Linears of every Swin block.
BLOCK_LINEARS = r"layers\.\d+\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
#: The patch-merging reduction at the start of every stage after the first.
PATCH_MERGING = r"layers\.\d+\.downsample\.reduction"

TARGET_PRESETS: Dict[str, Tuple[str, ...]] = {
    "attn": (r"layers\.\d+\.blocks\.\d+\.attn\.(qkv|proj)",),
    "blocks": (BLOCK_LINEARS,),
    "all": (BLOCK_LINEARS, PATCH_MERGING),
}

#: Preset names that were replaced, and the preset that now selects the same modules.
RENAMED_PRESETS: Dict[str, str] = {"all+downsample": "all"}


def check_preset(key: str, name: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``name`` is a preset (a renamed one names its successor)."""
    if name in RENAMED_PRESETS:
        raise ConfigError(f"{key}={name!r} is now called {RENAMED_PRESETS[name]!r} (every body Linear, the "
                          f"patch-merging reductions included)", None, f"set {key}={RENAMED_PRESETS[name]}")
    if name not in TARGET_PRESETS:
        raise ConfigError(f"{key}={name!r} is not a target preset", None, f"choose one of {', '.join(TARGET_PRESETS)}")


def select_targets(module_names: Iterable[str], preset: str) -> List[str]:
    """The names (in their order) that a pattern of ``preset`` matches."""
    check_preset("targets", preset)
    patterns = [re.compile(p) for p in TARGET_PRESETS[preset]]
    return [n for n in module_names if any(p.fullmatch(n) for p in patterns)]


def target_linears(body: nn.Module, preset: str) -> List[str]:
    """The ``nn.Linear`` modules of ``body`` that ``preset`` selects, in module order."""
    return select_targets([n for n, m in body.named_modules() if isinstance(m, nn.Linear)], preset)
