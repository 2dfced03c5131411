"""AdamW for a packed sweep (:mod:`orca.packed`): K runs' optimizers as one over stacked tensors.

Why its own optimizer: the K runs' trainable tensors are stacked (run k owns row k of every
stack, :class:`orca.packed_model.Slot`), and K ``torch.optim.AdamW`` objects would each step
views of them, one small kernel per tensor per run. Here one ``_foreach`` op per AdamW term steps
all runs at once, each row with its own learning rate, weight decay and gradient clipping; the
runs' own optimizers keep only their schedules and the state their checkpoints hold.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from orca.packed_model import PackError, Slot


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the GPU: a copy from pageable memory
    first waits for every kernel queued before it, which twice a step let the GPU run dry while
    the host queued the next kernels; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PackedAdamW:
    """AdamW (torch's decoupled form) over the stacked tensors, each run with its own lr and decay.

    The learning rates come each step from the runs' own ``torch.optim.AdamW`` objects, which
    never step: their LambdaLR schedulers move their lrs, and :meth:`export` writes this state into
    them so that checkpoints hold ``optimizer.state_dict()`` exactly as a run alone saves it.
    """

    def __init__(self, slots: Sequence[Slot], optimizers: Sequence[torch.optim.Optimizer],
                 models: Sequence[torch.nn.Module], clip: Sequence[Optional[float]]):
        self.slots, self.optimizers = list(slots), list(optimizers)
        self.params = [s.param for s in self.slots]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0
        defaults = optimizers[0].defaults
        self.beta1, self.beta2 = defaults["betas"]
        self.eps = defaults["eps"]
        k = len(optimizers)
        device = self.params[0].device
        self.own = [dict(m.named_parameters()) for m in models]
        groups, decay = torch.zeros(len(slots), k, dtype=torch.long), torch.zeros(len(slots), k, dtype=torch.float64)
        for i, opt in enumerate(optimizers):
            where = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
            for s, slot in enumerate(self.slots):
                if slot.trained[i]:
                    g = where[id(self.own[i][slot.names[i]])]
                    groups[s, i], decay[s, i] = g, opt.param_groups[g]["weight_decay"]
        self.groups, self.decay = groups, decay
        self.trained = torch.tensor([s.trained for s in self.slots], dtype=torch.float64)
        self.trained_dev = self.trained.to(device=device, dtype=torch.float32)
        self.clip = torch.tensor([c if c else math.inf for c in clip], dtype=torch.float32, device=device)
        self.clipping = any(c for c in clip)
        self.max_groups = max(len(o.param_groups) for o in optimizers)

    def _views(self, rows: torch.Tensor) -> List[torch.Tensor]:
        """Row s of ``rows`` [slots, K] shaped to broadcast over slot s's stacked tensor."""
        return [rows[s].view(-1, *([1] * (p.ndim - 1))) for s, p in enumerate(self.params)]

    @torch.no_grad()
    def clip_grad_norm_(self) -> None:
        """Per run, ``clip_grad_norm_`` over that run's trained tensors (runs without clipping: x 1)."""
        if not self.clipping:
            return
        grads = [p.grad for p in self.params]
        k = self.clip.shape[0]
        norms = torch.stack([g.reshape(k, -1).float().norm(dim=1) for g in grads]) * self.trained_dev
        total = torch.linalg.vector_norm(norms, dim=0)
        coef = torch.where(torch.isinf(self.clip), torch.ones_like(total),
                           torch.clamp(self.clip / (total + 1e-6), max=1.0))
        torch._foreach_mul_(grads, [coef.view(-1, *([1] * (g.ndim - 1))) for g in grads])

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        k = len(self.optimizers)
        lrs = torch.zeros(k, self.max_groups, dtype=torch.float64)
        for i, opt in enumerate(self.optimizers):
            lrs[i, :len(opt.param_groups)] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
        lr = lrs.gather(1, self.groups.t()).t() * self.trained  # [slots, K]
        bc1, bc2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        rows = to_device(torch.stack([1 - lr * self.decay, -(lr / bc1)]).float(), self.params[0].device)
        grads = [p.grad for p in self.params]
        torch._foreach_mul_(self.params, self._views(rows[0]))
        torch._foreach_lerp_(self.exp_avg, grads, 1 - self.beta1)
        torch._foreach_mul_(self.exp_avg_sq, self.beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - self.beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, bc2 ** 0.5)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(self.exp_avg, denom)
        torch._foreach_mul_(update, self._views(rows[1]))
        torch._foreach_add_(self.params, update)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def load(self) -> None:
        """Take the runs' optimizer states (a resumed run's ``ckpt/last.pt``) into the stacks."""
        steps = set()
        for i, opt in enumerate(self.optimizers):
            for s, slot in enumerate(self.slots):
                state = opt.state.get(self.own[i][slot.names[i]]) if slot.trained[i] else None
                if state:
                    slot.view(self.exp_avg[s], i).copy_(state["exp_avg"])
                    slot.view(self.exp_avg_sq[s], i).copy_(state["exp_avg_sq"])
                    steps.add(int(state["step"]))
        if len(steps) > 1:
            raise PackError(f"the runs' optimizers stand at different steps {sorted(steps)}")
        self.step_count = steps.pop() if steps else 0

    @torch.no_grad()
    def export(self, i: int) -> Dict[str, Any]:
        """Run i's ``optimizer.state_dict()`` as its own AdamW would hold it after this many steps.
        Its moments are views of the live stacks: copy them before the next step (a checkpoint
        does, :meth:`orca.runs.CheckpointWriter.save_many`)."""
        opt = self.optimizers[i]
        if self.step_count:
            fused = bool(opt.defaults.get("fused"))
            for s, slot in enumerate(self.slots):
                if slot.trained[i]:
                    p = self.own[i][slot.names[i]]
                    step = torch.tensor(float(self.step_count), dtype=torch.float32,
                                        device=p.device if fused else "cpu")
                    opt.state[p] = {"step": step, "exp_avg": slot.view(self.exp_avg[s], i),
                                    "exp_avg_sq": slot.view(self.exp_avg_sq[s], i)}
        return opt.state_dict()
