"""Name -> object registries: the generic :class:`Registry`, and the task registry built on it.

Why one class, kept in the lowest package: every pluggable family (tasks here; adapter methods,
alignment objectives and gap metrics in orca and rank_estimation) needs the same three things --
refuse duplicate names (a silent overwrite hides a plugin), list names with shell-style patterns,
and fail on an unknown name with a message that suggests the nearest valid one. ``datasets``
imports nothing of ours, so the class lives here and every other layer builds on it. Families are
filled by explicit imports in their package ``__init__`` (never by star-import side effects), and
a test checks the expected names.

Why a schema per task: each task has its own knobs (Darcy's grid and coefficient values, an image
task's patch size). Keeping them in a dataclass next to the task's code lets the config system
validate ``task.options`` against the right schema, so a misspelt Darcy option fails at load time
with the nearest valid name, not an hour into a run.

A builder turns (options, data root) into a :class:`TaskData`: three splits plus everything the
stage-3 loop needs to train and score without knowing which task it runs (loss, metric, decoding).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Dataset


class Registry:
    """A named mapping from lowercase names to objects (usually classes or factories).

    Args:
        kind: what the entries are, used in error messages ("task", "adapter method", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: Optional[str] = None, obj: Any = None) -> Callable:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def _add(target: Any) -> Any:
            key = name if name is not None else getattr(target, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} registry: a name is required for {target!r}")
            if key != key.lower():
                raise ValueError(f"{self.kind} registry: name {key!r} must be lowercase")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = target
            return target

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> Any:
        """Return the entry for ``name``; unknown names raise with the closest valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._entries))})"

    def names(self, pattern: str = "*") -> List[str]:
        """Sorted registered names matching the fnmatch ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@dataclass
class TaskData:
    """What a task hands to the model and the training loop.

    Attributes:
        train, val, test: datasets yielding ``(x, y)``; ``x`` is ``[C, H, W]`` float.
        in_channels: ``C``.
        kind: ``"dense"`` (per-pixel regression, y ``[H_out, W_out]``) or ``"classification"``
            (y a class index).
        out_shape: target grid ``(H_out, W_out)`` for dense tasks, ``(num_classes,)`` for classification.
        loss: ``loss(out, y) -> scalar`` on the raw model output (a dense task decodes inside it).
        metric: ``metric(decode(out), y) -> [B]`` per-sample error in physical units, lower is better.
        metric_name: key under which the metric is logged (``"rel_l2"``, ``"error"``).
        decode: maps model output to physical units before ``metric`` (identity if None).
        info: free-form facts about the data written into the run summary (sizes, source, seed).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    kind: str
    out_shape: Tuple[int, ...]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    decode: Optional[torch.nn.Module] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("dense", "classification"):
            raise ValueError(f"TaskData.kind must be 'dense' or 'classification', got {self.kind!r}")


@dataclass
class TaskEntry:
    """A registered task: its options dataclass and the function that builds its data."""

    name: str
    options: type
    build: Callable[[Any, str], TaskData]
    description: str = ""


TASKS = Registry("task")


def register_task(name: str, options: type, description: str = "") -> Callable:
    """Decorator: ``@register_task("darcy", DarcyOptions)`` on ``build(opts, data_root) -> TaskData``."""

    def deco(build: Callable[[Any, str], TaskData]) -> Callable[[Any, str], TaskData]:
        TASKS.register(name, TaskEntry(name, options, build, description or (build.__doc__ or "").strip().split("\n")[0]))
        return build

    return deco


def get_task(name: str) -> TaskEntry:
    """The registered entry for ``name`` (raises with the nearest names when unknown)."""
    return TASKS.get(name)


def build_task(name: str, options: Any, data_root: str) -> TaskData:
    """Build the data of task ``name`` with an options instance of its schema."""
    entry = get_task(name)
    if not isinstance(options, entry.options):
        raise TypeError(f"task {name!r} needs options of type {entry.options.__name__}, got {type(options).__name__}")
    return entry.build(options, data_root)
