"""AdaLoRA (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
through HF peft: the baseline that allocates per-layer ranks *during training* from sensitivity scores,
beside our stage-2 rank maps allocated *before training* from the modality gap.

    bash scripts/stage3.sh configs/darcy_tiny.yaml adapter.method=adalora adapter.rank=8

Each targeted Linear becomes peft's ``SVDLinear``: W0 x + (alpha / r_active) B diag(E) A x with
A (r_init x d_in), E (r_init x 1), B (d_out x r_init). After every optimizer step peft's
``update_and_allocate(step)`` smooths the sensitivity |p * grad| of every entry (EMA, beta 0.85),
and between ``tinit`` and ``total_step - tfinal`` zeroes the least important singular values E_k until
the number of live triplets falls, on a cubic schedule, from ``r_init * n_modules`` to
``rank * n_modules``; the last ``tfinal`` steps train with the final pattern fixed.

Budget: ``adapter.rank`` is AdaLoRA's *target* average rank, so ``method=adalora rank=r`` ends with
the same number of live rank units as uniform ``method=lora rank=r`` on the same targets (each unit
costs d_in + d_out + 1 parameters here, one more than LoRA's, for E). It starts at
``adalora_init_rank`` (default ceil(1.5 r), peft's 12 -> 8 ratio). :meth:`AdaLoRAMethod.final_budget`
reports the live units and their parameter count, which is what a budget-matched comparison uses.

Why through peft and not our LoRA layers: a baseline should be the reference implementation, not our
re-reading of the paper. Two seams adapt peft to this loop:

- Gradients. peft reads ``p.grad`` in ``update_and_allocate``, which its examples call between
  ``optimizer.step()`` and ``zero_grad()``; our loop calls ``on_step_end`` after ``zero_grad``. A
  post-accumulate-grad hook keeps a reference to each adapter gradient (after clipping, which is in
  place), and they are put back for the call and released after it.
- Names. The adapter is named ``lora_adalora`` so that peft's parameters (``...qkv.lora_A.lora_adalora``)
  end with the ``lora_`` prefix that :func:`orca.adapters.base.is_adapter_param` counts. peft's
  allocator then also visits the (frozen) ``ranknum.lora_adalora`` buffers; they get a zero gradient,
  which gives them zero importance and leaves the triplet scores untouched.

The orthogonality penalty peft adds inside ``AdaLoraModel.forward`` only when the model returns a
``loss`` (never for a timm body) is computed in :meth:`AdaLoRAMethod.regularization` exactly as peft
does: orth_reg_weight * mean over A and B matrices of ||P P^T - I||_F (A A^T for A, B^T B for B).

Run length: the stage-3 loop passes its optimizer-step count to ``on_train_start``, which sets the
schedule; ``adapter.adalora_total_step`` overrides it. Used outside the loop, call
:meth:`AdaLoRAMethod.set_total_steps` first: the first ``on_step_start`` refuses to start without one.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from orca.adapters.base import AdapterMethod, set_trainable

#: peft adapter name; must start with ``lora_`` (see the module docstring, "Names").
ADAPTER_NAME = "lora_adalora"


def require_peft() -> Any:
    """Import peft's AdaLoRA pieces, or explain how to get them."""
    try:
        from peft import AdaLoraConfig
        from peft.tuners.adalora import AdaLoraModel
    except ImportError as err:  # peft is optional for everything else in orca
        raise RuntimeError(f"method 'adalora' needs HF peft (pip install 'peft>=0.21'), which failed to "
                           f"import ({err!r}); every other adapter method works without it") from None
    return AdaLoraConfig, AdaLoraModel


def schedule(total_step: int, tinit_frac: float, tfinal_frac: float) -> Dict[str, int]:
    """peft's (tinit, tfinal, total_step) from fractions of the run, keeping a budgeting phase.

    peft refuses ``tinit >= total_step - tfinal``; very short runs (tests, smoke runs) shrink tinit,
    then tfinal, until at least one step reallocates.
    """
    if isinstance(total_step, bool) or not isinstance(total_step, int) or total_step < 1:
        raise ValueError(f"AdaLoRA total_step={total_step!r}: must be an integer >= 1")
    tinit, tfinal = int(tinit_frac * total_step), int(tfinal_frac * total_step)
    while tinit > 0 and tinit >= total_step - tfinal:
        tinit -= 1
    while tfinal > 0 and tinit >= total_step - tfinal:
        tfinal -= 1
    return {"tinit": tinit, "tfinal": tfinal, "total_step": total_step}


def orthogonality(body: nn.Module, adapter: str = ADAPTER_NAME) -> Optional[torch.Tensor]:
    """peft's AdaLoRA regulariser without the weight: mean_P ||P P^T - I||_F over every A (P = A,
    r x d_in) and B (P = B^T, r x d_out) of ``adapter``; None when the body holds none."""
    terms: List[torch.Tensor] = []
    for name, p in body.named_parameters():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] != adapter or parts[-2] not in ("lora_A", "lora_B"):
            continue
        cov = p @ p.T if parts[-2] == "lora_A" else p.T @ p
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        return None
    return torch.stack(terms).mean()


class AdaLoRAMethod(AdapterMethod):
    """AdaLoRA on the targeted body Linears through peft (see the module docstring)."""

    name = "adalora"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.rank_map is not None:
            raise ValueError("adapter.method=adalora allocates its own ranks; adapter.rank_map must be "
                             "None (adapter.rank is the target average rank)")
        if cfg.loraplus_ratio is not None:
            raise ValueError("adapter.loraplus_ratio is not supported with adapter.method=adalora")
        self.init_rank = cfg.adalora_init_rank or math.ceil(1.5 * cfg.rank)
        if self.init_rank < cfg.rank:
            raise ValueError(f"adapter.adalora_init_rank={self.init_rank} < adapter.rank={cfg.rank}: AdaLoRA "
                             "only prunes, so it must start at or above its target rank")
        self.peft_model: Any = None
        self.total_step: Optional[int] = cfg.adalora_total_step
        self._grads: Dict[str, torch.Tensor] = {}
        self._body: Optional[nn.Module] = None

    # ------------------------------------------------------------------ surgery
    def adapt_body(self, body: nn.Module) -> None:
        AdaLoraConfig, AdaLoraModel = require_peft()
        cfg = self.cfg
        set_trainable(body, False)
        # peft re.fullmatch-es a string target against each module name, as our targets are matched.
        pattern = "|".join(f"(?:{p})" for p in cfg.target_patterns())
        linears = [n for n, m in body.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        if not linears:
            raise ValueError(f"adapter.targets={cfg.targets!r} matches no nn.Linear of the body")
        # The real schedule is set once the run length is known (set_total_steps); peft needs a
        # valid one at construction.
        peft_cfg = AdaLoraConfig(
            target_modules=pattern, init_r=self.init_rank, target_r=cfg.rank, lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout, orth_reg_weight=cfg.adalora_orth_reg_weight, deltaT=1,
            total_step=max(self.total_step or 1, 1), tinit=0, tfinal=0)
        self.peft_model = AdaLoraModel(body, peft_cfg, ADAPTER_NAME)
        self._body = body
        for name, p in body.named_parameters():
            if p.requires_grad and self._is_triplet(name):
                # Keep a reference to the accumulated gradient; see the module docstring, "Gradients".
                p.register_post_accumulate_grad_hook(lambda param, n=name: self._grads.__setitem__(n, param.grad))
        if self.total_step is not None:
            self.set_total_steps(self.total_step)

    @staticmethod
    def _is_triplet(name: str) -> bool:
        parts = name.split(".")
        return len(parts) >= 2 and parts[-1] == ADAPTER_NAME and parts[-2] in ("lora_A", "lora_B", "lora_E")

    @property
    def peft_config(self) -> Any:
        self._check_prepared()
        return self.peft_model.peft_config[ADAPTER_NAME]

    def _check_prepared(self) -> None:
        if self.peft_model is None:
            raise RuntimeError("method 'adalora': call prepare(model) first")

    def set_total_steps(self, total_step: int) -> None:
        """Fix the run length (optimizer steps) and derive peft's tinit / tfinal from it."""
        self._check_prepared()
        sched = schedule(total_step, self.cfg.adalora_tinit, self.cfg.adalora_tfinal)
        conf = self.peft_config  # the very object peft's RankAllocator reads
        conf.total_step, conf.tinit, conf.tfinal = sched["total_step"], sched["tinit"], sched["tfinal"]
        self.total_step = total_step

    # ------------------------------------------------------------------ step hooks
    def on_train_start(self, model: Any, total_steps: int) -> None:
        """The loop tells us the run length; an explicit ``adapter.adalora_total_step`` wins."""
        if self.cfg.adalora_total_step is None and self.total_step is None:
            self.set_total_steps(total_steps)

    def on_step_start(self, model: Any, step: int) -> None:
        if self.total_step is None:
            raise RuntimeError("method 'adalora' needs the run length for its budget schedule: set "
                               "adapter.adalora_total_step = train.epochs x optimizer steps per epoch "
                               "(or call method.set_total_steps(n) before training)")

    def on_step_end(self, model: Any, step: int) -> None:
        """peft's ``update_and_allocate(step)`` with this step's gradients restored."""
        self._check_prepared()
        restored = []
        for name, p in self._body.named_parameters():
            if self._is_triplet(name):
                grad = self._grads.get(name)
                p.grad = grad if grad is not None else torch.zeros_like(p)
                restored.append(p)
            elif name.split(".")[-1] == ADAPTER_NAME:  # ranknum: zero importance, never a triplet
                p.grad = torch.zeros_like(p)
                restored.append(p)
        try:
            self.peft_model.update_and_allocate(step)
        finally:
            for p in restored:
                p.grad = None
            self._grads.clear()

    def regularization(self, model: Any) -> Optional[torch.Tensor]:
        self._check_prepared()
        weight = self.cfg.adalora_orth_reg_weight
        if weight == 0:
            return None
        reg = orthogonality(self._body)
        return None if reg is None else weight * reg

    # ------------------------------------------------------------------ reporting
    def live_ranks(self) -> Dict[str, int]:
        """Module name -> number of non-zero singular values E_k (AdaLoRA's current rank)."""
        self._check_prepared()
        out = {}
        for name, p in self._body.named_parameters():
            parts = name.split(".")
            if parts[-1] == ADAPTER_NAME and parts[-2] == "lora_E":
                out[".".join(parts[:-2])] = int((p.detach() != 0).sum())
        return out

    def final_budget(self) -> Dict[str, Any]:
        """Live rank units and the adapter parameters they use, sum_i r_i (d_in + d_out + 1)."""
        ranks = self.live_ranks()
        params = 0
        for name, r in ranks.items():
            base = self._body.get_submodule(name).get_base_layer()
            params += r * (base.in_features + base.out_features + 1)
        return {"ranks": ranks, "rank_units": sum(ranks.values()), "adapter_params": params,
                "target_rank_units": self.cfg.rank * len(ranks)}

    def report(self) -> Dict[str, Any]:
        return {"final_budget": self.final_budget()}

    # ------------------------------------------------------------------ checkpoint state
    def state_for_checkpoint(self) -> Dict[str, Any]:
        """Run length, the allocator's sensitivity EMAs and rank pattern (exact resume), and the
        live budget (what ``scripts/hypothesis.py`` matches budgets on)."""
        self._check_prepared()
        alloc = self.peft_model.rankallocator
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        pattern = self.peft_config.rank_pattern
        return {"total_step": self.total_step, "exp_avg_ipt": cpu(alloc.exp_avg_ipt),
                "exp_avg_unc": cpu(alloc.exp_avg_unc),
                "rank_pattern": {k: [bool(b) for b in v] for k, v in pattern.items()} if pattern else None,
                "final_budget": self.final_budget()}

    def load_state(self, state: Dict[str, Any]) -> None:
        self._check_prepared()
        expected = {"total_step", "exp_avg_ipt", "exp_avg_unc", "rank_pattern", "final_budget"}
        if set(state) != expected:
            raise ValueError(f"AdaLoRA state must hold {sorted(expected)}; got {sorted(state)}")
        if state["total_step"] is not None:
            self.set_total_steps(int(state["total_step"]))
        alloc = self.peft_model.rankallocator
        params = dict(self._body.named_parameters())
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {k: v.to(params[k].device) for k, v in state[key].items()})
        alloc.ipt = {k: torch.zeros_like(v) for k, v in alloc.exp_avg_ipt.items()}
        self.peft_config.rank_pattern = state["rank_pattern"]
