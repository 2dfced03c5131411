"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in three tiers.

1. :class:`LoRALayer`, a mixin holding the adapter state of one layer (``r``, ``alpha``,
   ``scaling``, the ``lora_A`` / ``lora_B`` parameters, dropout, merged flag) and
   :meth:`LoRALayer.update_layer` which creates it.
2. :class:`LoRALinear`, the wrapper around a frozen ``nn.Linear`` (or an NF4 ``Linear4bit`` for
   QLoRA): ``forward``, ``get_delta_weight``, ``merge`` / ``unmerge``.
3. :func:`inject_lora` (with :func:`resolve_ranks`), the model-level surgery, and
   :class:`LoRAMethod`, the stage-3 method built on it.

Two kinds of strategy objects keep the wrapper free of if/elif chains:

- a *variant* (:class:`LoRAVariant`) decides how the update B A enters the forward pass and the
  merged weight: :class:`VanillaLoRA` here, DyLoRA's truncated rank in ``dylora.py``;
- a *base-weight accessor* (``DenseWeight``, ``NF4Weight`` in ``base_weights.py``) reads and
  writes the frozen W and runs the forward pass for that kind of base: a fused autograd Function
  (``FusedLoRALinear`` in ``lora_forward.py``) for dense W, bitsandbytes' kernel plus the LoRA matmuls for NF4. It
  is chosen by ``dispatch_base`` (first match wins, as peft's dispatchers).

Speed (measured on one H100, Swin-B, batch 256, bf16 autocast, eager): the naive composition
``base(x) + s * B(A(x))`` ran at 0.91x full fine-tuning, the fused Function at 0.98x, HF peft at
0.75x; compiled with CUDA graphs (one H200, ``results/bench/train_graphs_b{64,256}.md``) the fused
Function in its one-GEMM form (the compiled default, see ``DenseWeight``) runs at 1.07x full
fine-tuning at batch 64 and 256, and at 2.62x eager peft at batch 256. See ``scripts/bench_train.py`` /
``scripts/bench_adapters.py``.

One adapter per layer (peft keeps a dict of named adapters): a stage-3 run trains one method, and
the adapter is named by its module path, which is what error messages report.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from orca.adapters.base import AdapterMethod, set_trainable
from orca.adapters.base_weights import dispatch_base
from orca.adapters.registries import INIT_SCHEMES


# ---------------------------------------------------------------------------------------------
# A initialisation schemes
# ---------------------------------------------------------------------------------------------
@INIT_SCHEMES.register("kaiming")
def init_kaiming(a: torch.Tensor) -> None:
    """Kaiming-uniform with a = sqrt(5), i.e. nn.Linear's default: what the LoRA reference code
    (loralib) and peft use, so results are comparable with theirs."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


@INIT_SCHEMES.register("gaussian")
def init_gaussian(a: torch.Tensor) -> None:
    """N(0, 1/k) for A of shape (r, k): LoRA's "random Gaussian" (Hu et al. 2021, Sec. 4.1) at the
    variance Theta(1/n) that LoRA+ (Hayou et al. 2024, Init[1]) analyses; peft's "gaussian" uses
    std 1/r instead, which makes the initial A x grow with the width."""
    nn.init.normal_(a, std=1.0 / math.sqrt(a.shape[1]))


# ---------------------------------------------------------------------------------------------
# Variants: how B A enters forward and merge
# ---------------------------------------------------------------------------------------------
class LoRAVariant:
    """Strategy for the low-rank path of a :class:`LoRALinear`.

    A variant says which factors and which scaling are in use (:meth:`factors`); the forward pass,
    the dense ``delta_weight`` (merge, export, Delta-LoRA) and the base accessor's kernels all go
    through it, so they cannot disagree.
    """

    name = "variant"

    def factors(self, layer: "LoRALinear") -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(A in use, B in use, scaling)."""
        raise NotImplementedError

    def delta_weight(self, layer: "LoRALinear") -> torch.Tensor:
        a, b, scale = self.factors(layer)
        return (b.float() @ a.float()) * scale

    def forward(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.factors(layer)
        return layer.weight_access.lora_forward(layer, x, a, b, scale)

    def extra_repr(self) -> str:
        return self.name


class VanillaLoRA(LoRAVariant):
    """h = W0 x + s B A x (Hu et al. 2021, Eq. 3), computed as (x A^T) B^T: two thin matmuls,
    never the dense B A, so the cost is r (d_in + d_out) per token."""

    name = "lora"

    def factors(self, layer: "LoRALinear") -> Tuple[torch.Tensor, torch.Tensor, float]:
        return layer.lora_A, layer.lora_B, layer.scaling


# ---------------------------------------------------------------------------------------------
# Tier 1: the adapter-state mixin
# ---------------------------------------------------------------------------------------------
class LoRALayer:
    """Adapter state of one layer. Class attributes list it so that freezing, counting, saving and
    deleting code can be generic (peft's ``adapter_layer_names`` / ``other_param_names``)."""

    #: trainable tensors (the unique ``lora_`` prefix)
    adapter_layer_names: Tuple[str, ...] = ("lora_A", "lora_B")
    #: hyperparameters that define the adapter (written to the adapter JSON)
    other_param_names: Tuple[str, ...] = ("r", "alpha", "rslora", "dropout_p")

    base_layer: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def update_layer(self, r: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                     init_a: str = "kaiming", variant: Optional[LoRAVariant] = None) -> None:
        """Create A (r x d_in, random) and B (d_out x r, zero) so the layer starts as the base."""
        d_in, d_out = self.in_features, self.out_features
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank for {self.adapter_name!r} is {r!r}: must be an integer >= 1 "
                             "(use rank 0 in the rank map to leave a module unadapted)")
        if r > min(d_in, d_out):
            raise ValueError(f"LoRA rank {r} for {self.adapter_name!r} exceeds min(d_in, d_out) = "
                             f"min({d_in}, {d_out}) = {min(d_in, d_out)}: B A would be full rank")
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.r, self.alpha, self.rslora, self.dropout_p = r, float(alpha), bool(rslora), float(dropout)
        self.scaling = self.scaling_for(r)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=weight.device))
        INIT_SCHEMES.get(init_a)(self.lora_A.data)
        # No module at all when p = 0: an Identity would still be a call, and nn.Dropout(0) a kernel.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.variant = variant if variant is not None else VanillaLoRA()
        self.merged = False

    def scaling_for(self, r: int) -> float:
        """alpha / r (Hu et al. 2021, Sec. 4.1) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout (if any) and, outside autocast, a cast to the adapter dtype (QLoRA's base returns
        bf16 activations while A and B stay fp32)."""
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return x


# ---------------------------------------------------------------------------------------------
# Tier 2: the Linear wrapper
# ---------------------------------------------------------------------------------------------
class LoRALinear(nn.Module, LoRALayer):
    """A frozen Linear plus a low-rank update.

    The base layer keeps its own parameters (``base_layer.weight`` / ``.bias``; the bias is never
    touched) with ``requires_grad=False``, so autograd skips the weight-gradient matmuls that make
    up a third of a full fine-tuning step's FLOPs.

    Args:
        base_layer: ``nn.Linear`` or ``bitsandbytes.nn.Linear4bit``.
        r: rank (1 <= r <= min(d_in, d_out)).
        alpha: LoRA alpha; scaling alpha/r (alpha/sqrt(r) with ``rslora``).
        dropout: dropout probability on the LoRA path input.
        init_a: name in :data:`INIT_SCHEMES`.
        variant: forward / delta strategy (default :class:`VanillaLoRA`).
        name: module path (used in every error message about this adapter).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init_a: str = "kaiming", variant: Optional[LoRAVariant] = None,
                 name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = name
        self.weight_access = dispatch_base(base_layer, name)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(r, alpha, rslora=rslora, dropout=dropout, init_a=init_a, variant=variant)
        self.train(base_layer.training)  # injected into an eval-mode model, stay in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.variant.forward(self, x)

    def get_delta_weight(self) -> torch.Tensor:
        """The dense update s B A of shape (d_out, d_in), in fp32."""
        return self.variant.delta_weight(self)

    def merge(self, safe_merge: bool = False) -> None:
        """W <- W + s B A, so inference costs nothing extra.

        Args:
            safe_merge: merge into a copy first and refuse non-finite results, naming the adapter.
        """
        if self.merged:
            warnings.warn(f"Already merged ({self.adapter_name!r}). Nothing to do.")
            return
        delta = self.get_delta_weight()
        if safe_merge:
            merged = self.weight_access.get(self.base_layer).float().clone() + delta
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                 f"{self.adapter_name!r} seems to be broken")
            self.weight_access.set(self.base_layer, merged)
        else:
            self.weight_access.add_(self.base_layer, delta)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s B A (exact up to rounding in W's dtype; lossy for NF4, which re-quantises)."""
        if not self.merged:
            warnings.warn(f"Already unmerged ({self.adapter_name!r}). Nothing to do.")
            return
        self.weight_access.add_(self.base_layer, self.get_delta_weight(), alpha=-1.0)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """Dense W0 + s B A (fp32) without modifying the layer (merged export)."""
        weight = self.weight_access.get(self.base_layer).float()
        return weight.clone() if self.merged else weight + self.get_delta_weight()

    def extra_repr(self) -> str:
        return (f"name={self.adapter_name!r}, r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, variant={self.variant.extra_repr()}, "
                f"base={self.weight_access.kind}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------
# Tier 3: model-level surgery
# ---------------------------------------------------------------------------------------------
def lora_layers(module: nn.Module) -> Dict[str, LoRALinear]:
    """All LoRA wrappers under ``module``, by name relative to it."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALayer)}


def _linear_names(module: nn.Module) -> List[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]


def resolve_ranks(body: nn.Module, patterns: Sequence[str], rank: int,
                  rank_map: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Rank of every module to adapt: the targets at ``rank``, then ``rank_map`` overrides.

    A rank-map key is, in order of precedence: (1) the exact name of an ``nn.Linear``; (2) the exact
    name of another module (a block), applying to the targeted Linears inside it, the deepest such
    module winning; (3) a regex ``re.fullmatch``-ed against every Linear name of the body. Two
    regexes giving one module different ranks is an error. Rank 0 means "not adapted".

    Returns:
        ``{linear_name: rank}`` including the zero entries (so the map is complete and saved
        adapters rebuild exactly).

    Raises:
        ValueError: a target pattern or rank-map key that names no module, conflicting regexes.
    """
    if lora_layers(body):
        raise ValueError("the body already holds LoRA layers; adapt a fresh model")
    linears = _linear_names(body)
    ranks: Dict[str, int] = {}
    for pattern in patterns:
        hits = [n for n in linears if re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no nn.Linear of the body "
                             f"(Linear modules: {_preview(linears)})")
        ranks.update((n, rank) for n in hits)
    if not rank_map:
        return ranks
    modules = dict(body.named_modules())
    by_regex: Dict[str, Tuple[int, str]] = {}
    by_block: Dict[str, Tuple[int, str]] = {}  # linear -> (depth of block name, key)
    exact: Dict[str, str] = {}
    for key in rank_map:
        if key in modules and isinstance(modules[key], nn.Linear):
            exact[key] = key
        elif key in modules:
            inside = [n for n in ranks if n.startswith(key + ".")]
            if not inside:
                raise ValueError(f"rank_map key {key!r} names a module that contains no targeted "
                                 f"Linear (targets: {_preview(list(ranks))})")
            depth = key.count(".") + 1
            for n in inside:
                if n not in by_block or by_block[n][0] < depth:
                    by_block[n] = (depth, key)
        else:
            try:
                hits = [n for n in linears if re.fullmatch(key, n)]
            except re.error:
                hits = []
            if not hits:
                raise ValueError(f"rank_map key {key!r} names no module of the body (neither a "
                                 f"module name nor a regex matching a Linear; Linear modules: "
                                 f"{_preview(linears)})")
            for n in hits:
                if n in by_regex and rank_map[by_regex[n][1]] != rank_map[key]:
                    raise ValueError(f"rank_map keys {by_regex[n][1]!r} and {key!r} both match module "
                                     f"{n!r} with different ranks ({rank_map[by_regex[n][1]]} vs "
                                     f"{rank_map[key]})")
                by_regex[n] = (0, key)
    for table in (by_regex, by_block):  # lower precedence first, so later tables overwrite
        for n, (_, key) in table.items():
            ranks[n] = rank_map[key]
    for n, key in exact.items():
        ranks[n] = rank_map[key]
    return ranks


def _preview(names: Sequence[str], k: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "") or "none"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject_lora(body: nn.Module, ranks: Dict[str, int], *, alpha: float, rslora: bool = False,
                dropout: float = 0.0, init_a: str = "kaiming",
                make_variant: Callable[[str, int], LoRAVariant] = lambda name, r: VanillaLoRA(),
                ) -> Dict[str, LoRALinear]:
    """Replace each Linear named in ``ranks`` (rank > 0) by a :class:`LoRALinear` wrapping it.

    Returns:
        ``{name: wrapper}`` for the adapted modules.
    """
    wrapped: Dict[str, LoRALinear] = {}
    for name, r in ranks.items():
        if r == 0:
            continue
        base = body.get_submodule(name)
        layer = LoRALinear(base, r, alpha, rslora=rslora, dropout=dropout, init_a=init_a,
                           variant=make_variant(name, r), name=name)
        _set_submodule(body, name, layer)
        wrapped[name] = layer
    return wrapped


def merge_adapters(module: nn.Module, safe_merge: bool = False) -> None:
    for layer in lora_layers(module).values():
        layer.merge(safe_merge=safe_merge)


def unmerge_adapters(module: nn.Module) -> None:
    for layer in lora_layers(module).values():
        layer.unmerge()


def clip_to_full_rank(body: nn.Module, ranks: Dict[str, int]) -> Dict[str, int]:
    """``ranks`` with every rank above its Linear's min(d_in, d_out) lowered to it (a full-rank B A)."""
    modules = dict(body.named_modules())
    return {n: min(r, modules[n].in_features, modules[n].out_features) for n, r in ranks.items()}


# ---------------------------------------------------------------------------------------------
# The stage-3 method
# ---------------------------------------------------------------------------------------------
class LoRAMethod(AdapterMethod):
    """LoRA on the targeted body Linears with per-module ranks (0 = frozen); LoRA+ through
    ``loraplus_ratio`` in :meth:`param_groups`. Subclasses change the variant or add step hooks."""

    name = "lora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ranks: Dict[str, int] = {}
        self.layers: Dict[str, LoRALinear] = {}

    @property
    def uniform_rank(self) -> int:
        return self.cfg.rank

    def make_variant(self, name: str, r: int) -> LoRAVariant:
        return VanillaLoRA()

    def prepare_base(self, body: nn.Module) -> None:
        """Hook before injection (QLoRA quantises the base here)."""

    def adapt_body(self, body: nn.Module) -> None:
        cfg = self.cfg
        ranks = resolve_ranks(body, cfg.target_patterns(), self.uniform_rank, cfg.load_rank_map())
        if cfg.clip_rank:
            ranks = clip_to_full_rank(body, ranks)
        self.prepare_base(body)  # first: a QLoRA that cannot quantise leaves the body untouched
        set_trainable(body, False)
        self.layers = inject_lora(body, ranks, alpha=cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout,
                                  init_a=cfg.init_a, make_variant=self.make_variant)
        self.ranks = ranks

    def iter_layers(self) -> Iterator[Tuple[str, LoRALinear]]:
        if not self._prepared:
            raise RuntimeError(f"method {self.name!r}: call prepare(model) first")
        return iter(self.layers.items())
