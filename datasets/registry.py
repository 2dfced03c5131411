"""The task registry: a task name -> (options schema, builder) pair.

Why a schema per task: each task has its own knobs (Darcy's grid and coefficient values, an image
task's patch size). Keeping them in a dataclass next to the task's code lets the config system
validate ``task.options`` against the right schema, so a misspelt Darcy option fails at load time
with the nearest valid name, not an hour into a run.

A builder turns (options, data root) into a :class:`TaskData`: three splits plus everything the
stage-3 loop needs to train and score without knowing which task it runs (loss, metric, decoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from orca.registry import Registry


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
    import datasets  # noqa: F401  -- fills the registry by explicit imports

    return TASKS.get(name)


def build_task(name: str, options: Any, data_root: str) -> TaskData:
    """Build the data of task ``name`` with an options instance of its schema."""
    entry = get_task(name)
    if not isinstance(options, entry.options):
        raise TypeError(f"task {name!r} needs options of type {entry.options.__name__}, got {type(options).__name__}")
    return entry.build(options, data_root)
