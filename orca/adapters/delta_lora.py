"""Delta-LoRA (Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices"), Algorithm 1.

Why: plain LoRA leaves W0 untouched, which the paper blames for part of the gap to full
fine-tuning. Since dL/dW = dL/d(BA) (the update enters the forward pass additively), the change of
the product between two steps is a usable update direction for W at no extra memory: after each
optimizer step t > K,

    W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)           (Algorithm 1; s = alpha / r)

W itself stays frozen (``requires_grad=False``, not in the optimizer): no gradient, no optimizer
state. The paper also removes dropout on the LoRA path, because with dropout dL/d(BA) is no longer
dL/dW; ``dropout > 0`` therefore warns.

Implementation: ``on_step_start`` snapshots the small factors (A_t, B_t), ``on_step_end`` applies
the difference with two rank-r ``addmm_`` calls (never a dense copy of W), so nothing outlives a
step and resuming needs no extra state.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import torch

from orca.adapters.lora import LoRAMethod


class DeltaLoRAMethod(LoRAMethod):
    """LoRA whose frozen W follows the change of s B A, scaled by lambda, once step t > K."""

    name = "delta_lora"
    changes_frozen_body = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.dropout > 0:
            warnings.warn(f"Delta-LoRA with dropout={cfg.dropout}: Zi et al. (2023) drop dropout "
                          "because it breaks dL/dW = dL/d(BA), the basis of the W update")
        self._snapshot: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def active(self, step: int) -> bool:
        """Algorithm 1 updates W for 0-based steps t > K."""
        return step > self.cfg.delta_lora_start

    def on_step_start(self, model: Any, step: int) -> None:
        self._snapshot = {}
        if not self.active(step):
            return
        for name, layer in self.iter_layers():
            self._snapshot[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())

    @torch.no_grad()
    def on_step_end(self, model: Any, step: int) -> None:
        if not self.active(step):
            return
        if not self._snapshot:
            raise RuntimeError(f"Delta-LoRA step {step}: on_step_start(model, {step}) was not called "
                               "before this optimizer step, so B_t A_t is unknown")
        coeff = self.cfg.delta_lora_lambda
        for name, layer in self.iter_layers():
            if layer.merged:
                raise RuntimeError(f"Delta-LoRA cannot update merged adapter {name!r}; unmerge first")
            a_old, b_old = self._snapshot[name]
            weight = layer.base_layer.weight
            s = coeff * layer.scaling
            # W += s * (B' A' - B A) as two rank-r products accumulated in place
            weight.addmm_(layer.lora_B.detach().to(weight.dtype), layer.lora_A.detach().to(weight.dtype),
                          alpha=s)
            weight.addmm_(b_old.to(weight.dtype), a_old.to(weight.dtype), alpha=-s)
        self._snapshot = {}
