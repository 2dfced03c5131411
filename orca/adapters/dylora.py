"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation").

Why it matters here: the project asks which rank a task needs. DyLoRA trains one adapter whose
first b components work on their own for every b in [r_min, r_max], so a single training run can
be evaluated at every rank (:func:`sweep_ranks`) instead of one run per rank.

Each step samples b ~ p_B and uses h = W0 x + (alpha / b) B[:, :b] A[:b] x (the paper's Eq. 3 with
W_up = B, W_dw = A). The "frozen" variant updates only component b (row b of A, column b of B), the
others being detached. Layers whose own rank (from a rank map) is below b use their full rank.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch

from orca.adapters.lora import LoRALayer, LoRAMethod, LoRAVariant
from orca.adapters.registries import RANK_DISTRIBUTIONS


# ---------------------------------------------------------------------------------------------
# Distributions of b
# ---------------------------------------------------------------------------------------------
@RANK_DISTRIBUTIONS.register("uniform")
def uniform_weights(r_min: int, r_max: int) -> torch.Tensor:
    """p(b) = 1 / (r_max - r_min + 1): the paper's choice."""
    return torch.ones(r_max - r_min + 1, dtype=torch.float64)


@RANK_DISTRIBUTIONS.register("linear")
def linear_weights(r_min: int, r_max: int) -> torch.Tensor:
    """p(b) ~ b. Component k trains only when b >= k, i.e. with probability P(b >= k); under the
    uniform law the last components train rarely, and this law evens that out."""
    return torch.arange(r_min, r_max + 1, dtype=torch.float64)


def sample_rank(dist: str, r_min: int, r_max: int, generator: torch.Generator) -> int:
    weights = RANK_DISTRIBUTIONS.get(dist)(r_min, r_max)
    return r_min + int(torch.multinomial(weights, 1, generator=generator).item())


# ---------------------------------------------------------------------------------------------
# The variant
# ---------------------------------------------------------------------------------------------
class DynamicRank(LoRAVariant):
    """Use only the first ``b`` components, scaled by alpha / b (alpha / sqrt(b) with rsLoRA).

    Args:
        r_max: the layer's allocated rank (rows of A).
        frozen: detach components 1..b-1 so only component b receives gradient.
    """

    name = "dylora"

    def __init__(self, r_max: int, frozen: bool = False):
        self.r_max = r_max
        self.frozen = frozen
        self.b = r_max  # before any sampling the layer is the full-rank LoRA

    def factors(self, layer: LoRALayer):
        b = self.b
        a, bmat = layer.lora_A[:b], layer.lora_B[:, :b]
        if self.frozen and b > 1 and torch.is_grad_enabled():
            a = torch.cat([a[: b - 1].detach(), a[b - 1:]], dim=0)
            bmat = torch.cat([bmat[:, : b - 1].detach(), bmat[:, b - 1:]], dim=1)
        return a, bmat, layer.scaling_for(b)

    def extra_repr(self) -> str:
        return f"dylora(b={self.b}/{self.r_max}, frozen={self.frozen})"


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
class DyLoRAMethod(LoRAMethod):
    """DyLoRA: b sampled in :meth:`on_step_start`; :meth:`eval_rank` evaluates at any b.

    b at step t is drawn from a generator seeded with (seed, t), so a resumed run draws the same
    ranks as an uninterrupted one; the seed (``torch.initial_seed()`` when the method is built, i.e.
    the run's seed) is the only state to checkpoint.
    """

    name = "dylora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seed = int(torch.initial_seed()) % (2**62)
        self.current_b = cfg.r_max

    @property
    def uniform_rank(self) -> int:
        return self.cfg.r_max

    @property
    def r_min(self) -> int:
        return self.cfg.dylora_r_min

    @property
    def r_max(self) -> int:
        return self.cfg.r_max

    def make_variant(self, name: str, r: int) -> DynamicRank:
        return DynamicRank(r, frozen=self.cfg.dylora_frozen)

    # ------------------------------------------------------------------ rank control
    def set_rank(self, model: Any, b: int) -> None:
        """Make every adapted layer use its first min(b, r_layer) components."""
        if isinstance(b, bool) or not isinstance(b, int) or not self.r_min <= b <= self.r_max:
            raise ValueError(f"DyLoRA rank b={b!r}: must be an integer in [dylora_r_min, dylora_r_max]"
                             f" = [{self.r_min}, {self.r_max}]")
        for name, layer in self.iter_layers():
            if layer.merged:
                raise RuntimeError(f"cannot change the rank of merged adapter {name!r}; unmerge first")
            layer.variant.b = min(b, layer.variant.r_max)
        self.current_b = b

    def sample(self, step: int) -> int:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        return sample_rank(self.cfg.dylora_dist, self.r_min, self.r_max, gen)

    def on_step_start(self, model: Any, step: int) -> None:
        self.set_rank(model, self.sample(step))

    @contextlib.contextmanager
    def eval_rank(self, model: Any, b: Optional[int] = None) -> Iterator[None]:
        """Evaluate at ``b`` (default ``dylora_eval_rank``, else r_max); restores the training b."""
        if b is None:
            b = self.cfg.dylora_eval_rank if self.cfg.dylora_eval_rank is not None else self.r_max
        previous = self.current_b
        self.set_rank(model, b)
        try:
            yield
        finally:
            self.set_rank(model, previous)

    # ------------------------------------------------------------------ checkpoint state
    def state_for_checkpoint(self) -> Dict[str, Any]:
        return {"seed": self.seed}

    def load_state(self, state: Dict[str, Any]) -> None:
        if set(state) != {"seed"}:
            raise ValueError(f"DyLoRA state must hold exactly 'seed'; got keys {sorted(state)}")
        self.seed = int(state["seed"])


def sweep_ranks(method: DyLoRAMethod, model: Any, evaluate: Callable[[], Any],
                ranks: Optional[Iterable[int]] = None) -> Dict[int, Any]:
    """Evaluate one trained DyLoRA model at every rank b (default: r_min..r_max).

    Args:
        method: the prepared :class:`DyLoRAMethod`.
        model: the model it prepared.
        evaluate: zero-argument callable returning the metric at the current rank.
        ranks: the ranks to visit.

    Returns:
        ``{b: evaluate()}``.
    """
    if not isinstance(method, DyLoRAMethod):
        raise TypeError(f"sweep_ranks needs a DyLoRA method, got {type(method).__name__}")
    ranks = range(method.r_min, method.r_max + 1) if ranks is None else ranks
    results: Dict[int, Any] = {}
    for b in ranks:
        with method.eval_rank(model, b):
            results[b] = evaluate()
    return results
