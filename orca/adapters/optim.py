"""Optimizer parameter groups (weight decay, LoRA+) and optimizer construction.

Why groups are keyed by their (lr, weight decay) pair: a scheduler scales every group's lr by the
same factor, so LoRA+'s ratio lr_B / lr_A (Hayou et al. 2024, Sec. 4) survives warm-up and decay;
and one group per distinct pair keeps the optimizer state small and its logs readable.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "paged_adamw")


def build_param_groups(
    named_params: Iterable[Tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    no_decay: Callable[[str, nn.Parameter], bool] = lambda name, p: p.ndim <= 1,
) -> List[Dict[str, Any]]:
    """Group trainable parameters by (lr * lr_scale(name), weight decay or 0).

    Args:
        named_params: ``model.named_parameters()``; frozen parameters are skipped.
        lr: base learning rate (lr_A under LoRA+).
        weight_decay: decay of 2-D weights; biases, norms and ``no_decay`` parameters get 0.
        lr_scale: multiplier per parameter name (LoRA+: the ratio for ``lora_B``).
        no_decay: which parameters are exempt from weight decay.

    Returns:
        A list of ``{"params", "lr", "weight_decay", "name"}`` dicts, one per distinct pair, in
        first-seen order. ``name`` is ``"decay"`` / ``"no_decay"`` with ``"@x{scale}"`` appended
        for scaled groups.
    """
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        scale = float(lr_scale(name))
        decay = 0.0 if no_decay(name, p) else float(weight_decay)
        key = (lr * scale, decay)
        if key not in groups:
            label = "decay" if decay else "no_decay"
            if scale != 1.0:
                label += f"@x{scale:g}"
            groups[key] = {"params": [], "lr": key[0], "weight_decay": decay, "name": label}
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters: was the method's prepare(model) called?")
    return list(groups.values())


def build_optimizer(
    groups: Sequence[Dict[str, Any]],
    name: str = "adamw",
    lr: Optional[float] = None,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    fused: Optional[bool] = None,
) -> torch.optim.Optimizer:
    """Build the optimizer for ``groups`` (whose lr / weight_decay entries take precedence).

    Args:
        groups: from ``AdapterMethod.param_groups``.
        name: ``adamw``, ``sgd`` or ``paged_adamw``: bitsandbytes' paged AdamW (QLoRA, Dettmers et
            al. 2023, Sec. 3), optimizer state in unified memory that pages to CPU under memory
            spikes; CUDA only, raises otherwise.
        lr: default lr for groups without one.
        fused: fused AdamW kernel (None: fused when every parameter is on CUDA).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: allowed values are {list(OPTIMIZERS)}")
    params = [p for g in groups for p in g["params"]]
    default_lr = lr if lr is not None else groups[0]["lr"]
    if name == "paged_adamw":
        on_cuda = all(p.device.type == "cuda" for p in params)
        if not on_cuda:
            raise RuntimeError("paged AdamW (bitsandbytes) needs every parameter on a CUDA device; "
                               "move the model to the GPU first or set train.optimizer=adamw")
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("paged AdamW needs bitsandbytes (pip install bitsandbytes)") from err
        return bnb.optim.PagedAdamW(list(groups), lr=default_lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(list(groups), lr=default_lr, momentum=momentum)
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(list(groups), lr=default_lr, betas=betas, eps=eps, fused=fused)
