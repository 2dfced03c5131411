"""Adapter methods: the interface between stage 3's training loop and every fine-tuning method.

The loop knows nothing about LoRA. It calls, in this order::

    method = build_method(cfg)                        # cfg: AdapterConfig
    counts = method.prepare(model)                    # freeze / inject into model.body
    opt = torch.optim.AdamW(method.param_groups(model, lr, weight_decay), ...)
    for step, batch in ...:                           # step = 0-based optimizer step
        method.on_step_start(model, step)             # once per optimizer step, before forward
        loss = ...; loss.backward(); opt.step(); opt.zero_grad()
        method.on_step_end(model, step)               # after opt.step()
    # and inside each micro-step: loss = task_loss + method.regularization(model) (if not None)
    with method.eval_rank(model):                     # evaluation rank (DyLoRA; no-op otherwise)
        evaluate(model)
    ckpt["adapter_state"] = method.state_for_checkpoint()   # resume: method.load_state(...)

``model`` is anything with ``.embedder``, ``.body`` and ``.head`` modules (ORCAModel; a stand-in in
tests). Only ``model.body`` is adapted; the embedder and head are new modules for the target task,
so they are trained (or not) by the ``train_embedder`` / ``train_head`` flags.

Contract details:
- ``prepare(model) -> dict`` returns the parameter accounting of :func:`count_parameters`.
- ``param_groups(model, lr, weight_decay) -> list[dict]``: exactly one group per distinct
  (lr, weight_decay); no decay on biases, norms and timm's ``no_weight_decay()`` parameters;
  LoRA+ puts every ``lora_B`` at ``loraplus_ratio * lr``. Each group has a ``name`` key.
- Trainable adapter parameters are named ``lora_A`` / ``lora_B`` (the prefix ``lora_`` is
  unique), so freezing, counting and saving stay generic.
- ``on_step_start`` / ``on_step_end`` are called once per *optimizer* step (with gradient
  accumulation: before the first micro-batch and after ``optimizer.step()``).
- ``eval_rank(model, b=None)`` is a context manager; ``b=None`` means the method's evaluation rank.
- ``state_for_checkpoint()`` / ``load_state(state)`` carry state that is not in parameters.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from orca.adapters.config import AdapterConfig
from orca.registry import Registry

ADAPTERS = Registry("adapter method")

#: The unique name prefix of trainable adapter parameters.
ADAPTER_PREFIX = "lora_"

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def build_method(cfg: AdapterConfig) -> "AdapterMethod":
    """Instantiate the registered method named by ``cfg.method``."""
    return ADAPTERS.get(cfg.method)(cfg)


def is_adapter_param(name: str) -> bool:
    """True for trainable adapter parameters (``...lora_A`` / ``...lora_B``)."""
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter represents (a packed NF4 weight stores 2 per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(math.prod(quant_state.shape))
    return p.numel()


def check_model(model: Any) -> None:
    """Refuse objects without the three parts the methods rely on."""
    missing = [a for a in ("embedder", "body", "head") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing:
        raise TypeError(f"adapter methods need a model with nn.Module attributes .embedder, .body and "
                        f".head; {type(model).__name__} lacks {missing}")


def set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def count_parameters(model: Any) -> Dict[str, Any]:
    """Parameter accounting of a prepared model.

    Returns:
        ``embedder``, ``head``, ``adapters`` (``lora_*`` in the body), ``other`` (other trainable
        body parameters: norms, or everything under full fine-tuning): trainable counts by group;
        ``trainable`` (their sum); ``total`` (all parameters, adapters included); ``body`` (the
        body's own parameters, adapters excluded); ``body_fraction`` = trainable body parameters /
        ``body`` (1.0 for full fine-tuning).
    """
    check_model(model)
    counts = {"embedder": 0, "head": 0, "adapters": 0, "other": 0}
    total = body = 0
    parts = (("embedder", model.embedder), ("head", model.head), ("body", model.body))
    seen = set()
    for part, module in parts:
        for name, p in module.named_parameters():
            if id(p) in seen:  # a parameter shared between parts counts once
                continue
            seen.add(id(p))
            n = logical_numel(p)
            total += n
            adapter = part == "body" and is_adapter_param(name)
            if part == "body" and not adapter:
                body += n
            if not p.requires_grad:
                continue
            group = part if part != "body" else ("adapters" if adapter else "other")
            counts[group] += n
    trainable = sum(counts.values())
    counts.update(trainable=trainable, total=total, body=body,
                  body_fraction=(counts["adapters"] + counts["other"]) / body if body else 0.0)
    return counts


def no_decay_names(model: nn.Module) -> set:
    """Names (relative to ``model``) that timm's ``no_weight_decay()`` convention exempts."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if not callable(fn):
            continue
        keys = set(fn())
        for name, _ in module.named_parameters():
            if name in keys or any(name.endswith("." + k) for k in keys):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


class AdapterMethod:
    """A fine-tuning method: how the body is adapted and how its parameters are optimised.

    Subclasses override :meth:`adapt_body` (the surgery) and, when the method needs them, the step
    hooks, :meth:`eval_rank` and the checkpoint state. See the module docstring for the contract.
    """

    name = "base"
    #: Whether training writes the body's frozen weights in place (Delta-LoRA): checkpoints then
    #: hold the whole body, as :mod:`orca.model_state` cannot rebuild it from the config.
    changes_frozen_body = False

    def __init__(self, cfg: AdapterConfig):
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"{type(self).__name__} needs an AdapterConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._prepared = False

    # ------------------------------------------------------------------ surgery
    def adapt_body(self, body: nn.Module) -> None:
        """Freeze and/or modify the body in place. The default freezes it entirely."""
        set_trainable(body, False)

    def prepare(self, model: Any) -> Dict[str, Any]:
        """Adapt ``model.body``, set which parts train, and return :func:`count_parameters`."""
        check_model(model)
        self.prepare_body(model.body)
        set_trainable(model.embedder, self.cfg.train_embedder)
        set_trainable(model.head, self.cfg.train_head)
        return count_parameters(model)

    def prepare_body(self, body: nn.Module) -> None:
        """The body-only part of :meth:`prepare` (a bare timm model, e.g. to load an adapter)."""
        if self._prepared:
            raise RuntimeError(f"method {self.name!r} has already prepared a model; build a new "
                               "method object per model")
        self.adapt_body(body)
        if self.cfg.train_norms:
            for module in body.modules():
                if isinstance(module, _NORM_TYPES):
                    set_trainable(module, True)
        self._prepared = True

    # ------------------------------------------------------------------ optimisation
    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter ``name`` (LoRA+: ``ratio`` for ``lora_B``)."""
        ratio = self.cfg.loraplus_ratio
        return float(ratio) if ratio is not None and name.rsplit(".", 1)[-1] == "lora_B" else 1.0

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> List[Dict[str, Any]]:
        """Optimizer parameter groups: one per distinct (lr, weight decay); see the contract."""
        from orca.adapters.optim import build_param_groups

        exempt = no_decay_names(model)
        return build_param_groups(
            model.named_parameters(), lr=lr, weight_decay=weight_decay, lr_scale=self.lr_scale,
            no_decay=lambda name, p: p.ndim <= 1 or name in exempt)

    # ------------------------------------------------------------------ step hooks
    def on_step_start(self, model: Any, step: int) -> None:
        """Called once per optimizer step before the forward pass (DyLoRA samples b here)."""

    def on_train_start(self, model: Any, total_steps: int) -> None:
        """Called once before training with the run's optimizer-step count (AdaLoRA's schedule)."""

    def on_step_end(self, model: Any, step: int) -> None:
        """Called after ``optimizer.step()`` (Delta-LoRA updates W here)."""

    def regularization(self, model: Any) -> Optional[torch.Tensor]:
        """An extra loss term added to the task loss each micro-step (AdaLoRA's orthogonality), or None."""
        return None

    @contextlib.contextmanager
    def eval_rank(self, model: Any, b: Optional[int] = None) -> Iterator[None]:
        """Evaluate at rank ``b``; only rank-dynamic methods (dylora) accept a ``b``."""
        if b is not None:
            raise ValueError(f"method {self.name!r} has a fixed rank; eval_rank(b={b}) needs "
                             "method 'dylora'")
        yield

    def report(self) -> Dict[str, Any]:
        """What the method decided during training and the analyses need, for ``summary.json``
        (AdaLoRA: its final ranks and budget). Why there: checkpoints stay out of git, summaries don't."""
        return {}

    # ------------------------------------------------------------------ checkpoint state
    def state_for_checkpoint(self) -> Dict[str, Any]:
        """State beyond parameters needed to resume exactly (none for most methods)."""
        return {}

    def load_state(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state; got keys {sorted(state)}")


class FullFineTuning(AdapterMethod):
    """Train every parameter: the reference the seed compares LoRA against (ORCA's refine stage)."""

    name = "full"

    def adapt_body(self, body: nn.Module) -> None:
        set_trainable(body, True)


class HeadOnly(AdapterMethod):
    """Train only the embedder and the head (the body frozen): the zero-rank end of the sweep."""

    name = "head"

