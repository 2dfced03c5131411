"""Activation checkpointing of a Swin body by stage or by block (``train.grad_checkpointing``).

An entry is a stage index ``S`` (every block of stage S) or a string ``"S:K"`` (the first K >= 1
blocks of stage S). Checkpointed blocks keep only their input in the forward pass and run their
forward again in backward: memory for compute.

Why blocks, not only stages: every Swin block costs about the same FLOPs, but activation memory
per block scales with tokens x width, so it is not spread evenly. In Swin-B at 224 px, stage 0
(2 blocks, 3136 tokens x 128) holds ~26% of it, stage 1 ~13%, stage 2 ~58% over 18 blocks (3.2%
per block) and stage 3 ~3%. ``[0, 1, "2:6"]`` recomputes 10 of 24 blocks for ~58% of the memory;
whole stages offer only 4 steps.

How: a whole stage (and ``"S:K"`` with K = the stage's depth) sets timm's own
``stage.grad_checkpointing`` flag, as before; ``"S:K"`` with K < depth replaces that one stage's
``forward`` (an instance attribute, the class is untouched) by one that runs the downsampling and
then checkpoints the first K blocks one by one with non-reentrant ``torch.utils.checkpoint`` (what
timm does for a whole stage, DDP- and torch.compile-safe; the RNG state is replayed, so drop-path
masks match). No module is added, renamed or wrapped: ``state_dict`` keys, adapter names and peft
exports are unchanged.

YAML note: PyYAML reads an unquoted ``2:6`` as the base-60 integer 126, so write ``"2:6"`` (on a
shell: ``'train.grad_checkpointing=[0, 1, "2:6"]'``); a stage index >= 60 is refused with that hint.
"""
from __future__ import annotations

import re
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from timm.models import swin_transformer, swin_transformer_v2
from torch import nn

from orca.schema import ConfigError

Entry = Union[int, str]
KEY = "train.grad_checkpointing"
_ENTRY_RE = re.compile(r"\s*(\d+)\s*(?::\s*(-?\d+)\s*)?")
_FORMS = "a stage index S (all its blocks) or a string 'S:K' (the first K >= 1 blocks of stage S)"
_ATTR = "orca_checkpoint_blocks"  # on a stage whose forward we replaced: how many leading blocks


def parse_entry(entry: Any, where: str = KEY, body_facts: str = "") -> Tuple[int, Optional[int]]:
    """``2`` or ``"2"`` -> (2, None) (whole stage); ``"2:6"`` -> (2, 6). Syntax only: no body needed.

    Raises:
        ConfigError: not an int >= 0 nor an ``"S:K"`` string with K >= 1; a stage index >= 60 (YAML's
            base-60 reading of an unquoted ``S:K``: the message gives the quoted form to use).
    """
    def bad(reason: str) -> ConfigError:
        forms = f"; an entry is {_FORMS}" if where else ""  # normalize's message already says it
        return ConfigError(f"{where}: entry {entry!r} {reason}{forms}{body_facts}")

    if isinstance(entry, int) and not isinstance(entry, bool):
        stage, k = entry, None
    elif isinstance(entry, str) and _ENTRY_RE.fullmatch(entry):
        m = _ENTRY_RE.fullmatch(entry)
        stage, k = int(m.group(1)), (None if m.group(2) is None else int(m.group(2)))
    else:
        raise bad("is malformed")
    if stage < 0:
        raise bad("is negative (stage indices are 0-based)")
    if isinstance(entry, int) and stage >= 60:
        s, kk = divmod(stage, 60)
        raise bad(f"is no Swin stage: YAML reads an unquoted {s}:{kk} as the base-60 number {stage}, "
                  f"quote it: \"{s}:{kk}\"")
    if k is not None and k < 1:
        raise bad(f"asks for K = {k} blocks of stage {stage}: K must be >= 1")
    return stage, k


def normalize(entries: Optional[Sequence[Any]], where: str = KEY, body_facts: str = "") -> Optional[List[Entry]]:
    """Check syntax and distinct stages; whole stages become ints, the rest canonical ``"S:K"`` strings.

    ``None`` stays ``None`` (off). Used by the config (no body yet) and by :func:`set_checkpointing`.
    Every message starts with the one this setting always gave: ``... must be a list of distinct
    0-based stage indices``.
    """
    if entries is None:
        return None
    head = (f"{where}={entries!r} must be a list of distinct 0-based stage indices, e.g. [0, 1], "
            f"or 'S:K' strings for the first K blocks of stage S, e.g. [0, 1, \"2:6\"]")
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ConfigError(head + body_facts)
    out: List[Entry] = []
    seen: Dict[int, Any] = {}
    for entry in entries:
        try:
            stage, k = parse_entry(entry, "", body_facts)
        except ConfigError as err:
            raise ConfigError(f"{head}{err}") from None
        if stage in seen:
            raise ConfigError(f"{head}: stage {stage} is listed twice ({seen[stage]!r} and {entry!r}){body_facts}")
        seen[stage] = entry
        out.append(stage if k is None else f"{stage}:{k}")
    return out


def describe(entries: Optional[Sequence[Any]]) -> str:
    """``[0, 1, "2:6"]`` -> ``"0 1 2:6"`` (the ``bench_train.py --grad-checkpointing`` spelling); ``""`` if off."""
    return " ".join(str(e) for e in (normalize(entries) or []))


def _stages(body: nn.Module, where: str = KEY) -> nn.ModuleList | nn.Sequential:
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ConfigError(f"{where}: body {type(body).__name__} has no stages (layers)")
    return layers


def _depths(layers) -> List[int]:
    return [len(stage.blocks) if hasattr(stage, "blocks") else 0 for stage in layers]


def _body_facts(layers) -> str:
    return f"; the body has {len(layers)} stages (0..{len(layers) - 1}) of depths {_depths(layers)}"


def plan(body: nn.Module, entries: Optional[Sequence[Any]], where: str = KEY) -> Dict[int, int]:
    """``{stage: number of leading blocks checkpointed}`` that ``entries`` mean for ``body``, validated.

    Raises:
        ConfigError: a malformed entry, a stage listed twice, a stage the body does not have, K out
            of 1..depth; each message names the entry, the body's stage count and the stage depths.
    """
    if entries is None:
        return {}
    layers = _stages(body, where)
    facts = _body_facts(layers)
    depths = _depths(layers)
    out: Dict[int, int] = {}
    for entry, canonical in zip(entries, normalize(entries, where, facts) or []):
        stage, k = parse_entry(canonical)
        if stage >= len(layers):
            raise ConfigError(f"{where}={list(entries)!r}: stage {stage} does not exist; the body has {len(layers)} "
                              f"stages (0..{len(layers) - 1}) of depths {depths} (entry {entry!r})")
        if not isinstance(getattr(layers[stage], "blocks", None), nn.Sequential):
            raise ConfigError(f"{where}: entry {entry!r}: stage {stage} ({type(layers[stage]).__name__}) has no "
                              f"sequence of blocks{facts}")
        depth = depths[stage]
        if k is not None and not 1 <= k <= depth:
            raise ConfigError(f"{where}: entry {entry!r}: stage {stage} has {depth} block{'s' * (depth != 1)}, "
                              f"so K must be in 1..{depth}{facts}")
        if k is not None and k < depth and type(layers[stage]).forward not in _stage_forwards():
            raise ConfigError(f"{where}: entry {entry!r}: checkpointing part of a stage knows timm's Swin stages "
                              f"(downsample, then blocks), not {type(layers[stage]).__name__}; list whole stages")
        out[stage] = depth if k is None else k
    return out


def _stage_forwards() -> Tuple[Any, ...]:
    """The stage forwards that :func:`_forward_first_blocks_checkpointed` reproduces (downsample, then blocks)."""
    return (swin_transformer.SwinTransformerStage.forward, swin_transformer_v2.SwinTransformerV2Stage.forward)


def _forward_first_blocks_checkpointed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Swin stage's forward (downsample, then blocks; timm's v1 and v2 stages alike) that
    recomputes the first ``self.orca_checkpoint_blocks`` blocks in backward."""
    x = self.downsample(x)
    k = getattr(self, _ATTR)
    if not torch.is_grad_enabled() or torch.jit.is_scripting():
        return self.blocks(x)
    for i, block in enumerate(self.blocks):
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if i < k else block(x)
    return x


def _reset(stage: nn.Module) -> None:
    if hasattr(stage, "grad_checkpointing"):
        stage.grad_checkpointing = False
    if _ATTR in stage.__dict__:
        del stage.__dict__[_ATTR]
        stage.__dict__.pop("forward", None)


def set_checkpointing(body: nn.Module, entries: Optional[Sequence[Any]], where: str = KEY) -> Optional[Dict[int, int]]:
    """Recompute the listed stages / leading blocks of ``body`` in backward (``train.grad_checkpointing``).

    The one place that applies the setting (stage 0 pretraining, stage 3, ``orca.bench``).
    ``None`` leaves the body as it is; a list sets exactly what it names (every other stage is
    switched off). Returns ``{stage: blocks checkpointed}`` (``None`` for ``None``). ``where`` names
    the setting in error messages.
    """
    if entries is None:
        return None
    wanted = plan(body, entries, where)
    layers = _stages(body)
    for i, stage in enumerate(layers):
        _reset(stage)
        k = wanted.get(i)
        if k is None:
            continue
        if k == len(stage.blocks) and hasattr(stage, "grad_checkpointing"):
            stage.grad_checkpointing = True  # timm's own whole-stage path
        else:
            setattr(stage, _ATTR, k)
            stage.forward = types.MethodType(_forward_first_blocks_checkpointed, stage)
    return wanted


def checkpointed_blocks(body: nn.Module) -> List[int]:
    """Per stage, how many leading blocks are recomputed in backward now (timm's flag or ours)."""
    out = []
    for stage in _stages(body):
        if _ATTR in stage.__dict__:
            out.append(stage.__dict__[_ATTR])
        elif getattr(stage, "grad_checkpointing", False):
            out.append(len(stage.blocks))
        else:
            out.append(0)
    return out


def summary(body: nn.Module) -> str:
    """One line for logs and benchmark tables, e.g. ``stage 0: 2/2 blocks, stage 2: 6/18 blocks (10 of 24 blocks)``."""
    done, depths = checkpointed_blocks(body), _depths(_stages(body))
    parts = [f"stage {i}: {k}/{d} blocks" for i, (k, d) in enumerate(zip(done, depths)) if k]
    if not parts:
        return "off"
    return f"{', '.join(parts)} ({sum(done)} of {sum(depths)} blocks)"
