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
- a *base-weight accessor* (:class:`DenseWeight` here, ``NF4Weight`` in ``qlora.py``) reads and
  writes the frozen W and runs the forward pass for that kind of base: a fused autograd Function
  (:class:`FusedLoRALinear`) for dense W, bitsandbytes' kernel plus the LoRA matmuls for NF4. It
  is chosen by :func:`dispatch_base` (first match wins, as peft's dispatchers).

Speed (measured on one H100, Swin-B, batch 256, bf16 autocast, eager): the naive composition
``base(x) + s * B(A(x))`` ran at 0.91x full fine-tuning, the fused Function at 0.98x, HF peft at
0.75x; compiled with CUDA graphs (one H200, ``results/bench/train_graphs_b{64,256}.md``) the fused
Function in its one-GEMM form (the compiled default, see :class:`DenseWeight`) runs at 1.07x full
fine-tuning at batch 64 and 256, and at 2.62x eager peft at batch 256. See ``scripts/bench_train.py`` /
``scripts/bench_adapters.py``.

One adapter per layer (peft keeps a dict of named adapters): a stage-3 run trains one method, and
the adapter is named by its module path, which is what error messages report.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from orca.adapters.base import AdapterMethod, set_trainable
from orca.adapters.lora_grads import lora_factor_grads
from orca.registry import Registry

# ---------------------------------------------------------------------------------------------
# A initialisation schemes
# ---------------------------------------------------------------------------------------------
INIT_SCHEMES = Registry("LoRA init scheme")


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
# Base-weight accessors (dense W or quantised W)
# ---------------------------------------------------------------------------------------------
class DenseWeight:
    """Read / write the frozen weight of a plain ``nn.Linear`` (exact, in its own dtype).

    Its LoRA forward is :class:`FusedLoRALinear` in one of two forms, chosen by ``concat``: the
    base GEMM plus an in-place rank-r update of its output, or one GEMM over [x, x A^T] against
    [W, s B]. ``None`` (the default) takes the one-GEMM form while torch.compile traces and the
    in-place form in eager mode. Why: compiled with CUDA graphs on one H200 (Swin-B, r = 8 ``all``,
    ``results/bench/train_graphs_b{64,256}.md``) the one-GEMM form ran at 1.07x full fine-tuning at
    batch 64 and 256 where the in-place form ran at 0.97x and 0.96x: the rank-r update re-reads and
    rewrites the whole N x d_out output, a memory-bound pass that full fine-tuning does not make,
    while inductor writes [x, x A^T] in the kernel that produces x. In eager mode the concatenation
    is a separate copy (and one more launch per layer, where small batches are launch-bound), and
    the in-place form is the one measured there (1.02x full at batch 256 on an H100,
    results/bench/train_adapters.md).
    Subclasses pin the choice for benchmarks (:class:`ConcatDenseWeight`, :class:`InplaceDenseWeight`).
    """

    kind = "dense"
    concat: Optional[bool] = None
    join_backward = False  # see JoinedDenseWeight
    fuse_grads = False  # see FusedGradDenseWeight

    @staticmethod
    def get(base: nn.Module) -> torch.Tensor:
        return base.weight.data

    @staticmethod
    def set(base: nn.Module, weight: torch.Tensor) -> None:
        base.weight.data.copy_(weight.to(base.weight.dtype))

    @staticmethod
    def add_(base: nn.Module, delta: torch.Tensor, alpha: float = 1.0) -> None:
        base.weight.data.add_(delta.to(base.weight.dtype), alpha=alpha)

    @classmethod
    def lora_forward(cls, layer: "LoRALinear", x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """W0 x + bias + scale * B A x through :class:`FusedLoRALinear` (dropout needs the generic
        path: its LoRA input differs from the base input)."""
        if layer.lora_dropout is not None:
            return lora_forward_generic(layer, x, a, b, scale)
        concat = torch.compiler.is_compiling() if cls.concat is None else cls.concat
        return fused_lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, a, b, scale, concat=concat,
                                 join_backward=cls.join_backward, fuse_grads=cls.fuse_grads)


class ComposedDenseWeight(DenseWeight):
    """A dense base whose LoRA path is :func:`lora_forward_generic` (plain autograd ops) instead of
    :class:`FusedLoRALinear`. Not chosen by :func:`dispatch_base`: it is the reference that the fused
    Function is timed against (``scripts/bench_train.py --methods lora_composed``), since the
    Function's Python forward and backward add a fixed cost per adapted Linear per step that the
    composed ops, whose backward runs in C++, do not have."""

    kind = "dense (composed)"

    @staticmethod
    def lora_forward(layer: "LoRALinear", x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
        return lora_forward_generic(layer, x, a, b, scale)


class ConcatDenseWeight(DenseWeight):
    """A dense base that always takes the one-GEMM forward over [x, x A^T] against [W, s B], eager
    mode included. Not chosen by :func:`dispatch_base`: ``scripts/bench_train.py --methods
    lora_concat`` times it (in eager mode it is the one-GEMM form the default does not take)."""

    kind = "dense (concatenated GEMM)"
    concat = True


class InplaceDenseWeight(DenseWeight):
    """A dense base that always takes the base GEMM plus the in-place rank-r update, compiled
    included: the compiled default until the one-GEMM form measured faster, kept as the reference it
    is timed against (``scripts/bench_train.py --methods lora_inplace``)."""

    kind = "dense (in-place rank-r update)"
    concat = False


class JoinedDenseWeight(DenseWeight):
    """The default forward forms with the backward's two GEMMs over g joined into one:
    [dL/dx | dL/d(x A^T)] = g [W + s B A | s B] (N = d_in + r), instead of g (W + s B A) and then
    g (s B), a second pass over the N x d_out output gradient. Why a candidate, not the default:
    the profile in results/bench/train_compile_b256_profile.md has LoRA spending more GEMM time
    than full fine-tuning, much of it in rank-r GEMMs that each re-read an activation; this removes
    one of them per layer, at the price of an input gradient with row stride d_in + r, which eager
    consumers may copy. Measured, it does not pay: on an H200 at batch 256 it ran at 0.99x plain LoRA
    compiled and under CUDA graphs (results/bench/train_compile_sdpa_b256.md,
    train_graphs_sdpa_joined_b256.md), 0.96-0.97x eager, so :func:`dispatch_base` never picks it; it
    stays as ``scripts/bench_train.py --methods lora_joined``, the record of that experiment."""

    kind = "dense (joined backward GEMM)"
    join_backward = True


class FusedGradDenseWeight(DenseWeight):
    """The default forward forms with A's and B's gradients from one pass over the output gradient
    (:func:`orca.adapters.lora_grads.lora_factor_grads`, a Triton kernel on CUDA) instead of two
    GEMMs that each read it. Why a candidate, not the default: it removes one of the three
    memory-bound rank-r passes per layer that separate a LoRA step from one whose adapters cost
    nothing (``bench_train.py --methods rank0``), but the kernel's speed against cuBLAS's thin GEMMs
    has not been measured yet; ``scripts/bench_train.py --methods lora_fused`` times it beside
    ``lora``. On the CPU it computes exactly what :class:`DenseWeight` does."""

    kind = "dense (fused factor gradients)"
    fuse_grads = True


# ---------------------------------------------------------------------------------------------
# The LoRA forward: generic (any base layer) and fused (dense base)
# ---------------------------------------------------------------------------------------------
def lora_forward_generic(layer: "LoRALinear", x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """base(x) + scale * (x A^T) B^T for any base layer (NF4 included); the scaled add is folded
    into the second matmul (addmm, beta = 1) instead of a separate elementwise pass."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        # Cast once for both paths: autocast would cast x separately for the base matmul and for
        # x A^T, and keep both low-precision copies alive for backward. Same numbers either way.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    result = layer.base_layer(x)
    xa = F.linear(layer.lora_input(x), a)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(result.dtype),
                      b.t().to(result.dtype), alpha=scale)
    return out.view(result.shape)


class FusedLoRALinear(torch.autograd.Function):
    """h = x W^T + bias + s (x A^T) B^T with a hand-written backward.

    Why: autograd of the composed ops makes extra full-size passes over the activations -- the
    update (N x d_out) is written, added, and scaled again in backward, and the two input
    gradients (N x d_in) are summed by a separate kernel. Here the output is one GEMM with the LoRA
    term accumulated into it (addmm_ with beta = 1), and the input gradient is one GEMM against
    W + s B A, formed on the small d_out x d_in weight (in fp32 equal to the two-term sum to
    rounding; under bf16 autocast it carries one more bf16 rounding of W + s B A, the size of the
    rounding W itself already has). W gets a gradient only if it requires one (never under LoRA),
    so the step skips the weight-gradient GEMM that costs full fine-tuning a third of its
    linear-layer FLOPs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, concat=False, join_backward=False, fuse_grads=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = torch.mm(x2, a.t())
        if concat:
            # [x, xA^T] [W, s B]^T: the LoRA term joins the base GEMM's reduction (K = d_in + r), so the
            # N x d_out output is written once, not written, re-read and rewritten by addmm_. The
            # price is materialising [x, xA^T] (N x (d_in + r)), which torch.compile can fold into
            # the kernel that produces x; it is what backward keeps (x and xA^T as views of it).
            xcat = torch.cat([x2, xa], dim=1)
            wcat = torch.cat([weight, b * scale], dim=1)
            out = torch.addmm(bias, xcat, wcat.t()) if bias is not None else torch.mm(xcat, wcat.t())
            ctx.save_for_backward(xcat, weight, a, b)
        else:
            out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
            out.addmm_(xa, b.t(), alpha=scale)
            ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.in_shape, ctx.has_bias, ctx.concat = scale, shape, bias is not None, concat
        ctx.join_backward, ctx.fuse_grads = join_backward, fuse_grads
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        if ctx.concat:
            xcat, weight, a, b = ctx.saved_tensors
            d_in = weight.shape[1]
            x2, xa = xcat[:, :d_in], xcat[:, d_in:]
        else:
            x2, xa, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        s = ctx.scale
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        many_tokens = g.shape[0] >= weight.shape[0]
        joined = ctx.join_backward and need_x and need_a and many_tokens
        fused = ctx.fuse_grads and need_a and need_b and (many_tokens or not need_x)
        if fused:  # dL/dA and dL/dB from one pass over g; dL/dx below does not need g s B then
            grad_a, grad_b = lora_factor_grads(g, x2, xa, b, s)
            need_a = need_b = False
            gb = None
        elif joined:
            # [g (W + s B A) | g s B]: both products of g in one GEMM, returned as column slices
            d_in = weight.shape[1]
            joint = torch.mm(g, torch.cat([torch.addmm(weight, b, a, alpha=s), b * s], dim=1))
            grad_x, gb = joint[:, :d_in].view(ctx.in_shape), joint[:, d_in:]
        else:
            gb = torch.mm(g, b * s) if need_a or (need_x and not many_tokens) else None  # dL/d(x A^T), N x r
        if need_x and not joined:
            if many_tokens:
                # g W + (s g B) A = g (W + s B A): one GEMM against the d_out x d_in effective weight
                # instead of a second full-size pass that reads and rewrites grad_x. Forming it costs
                # 2 r d_in d_out FLOPs, less than the 2 N r d_in it saves once N >= d_out.
                grad_x = torch.mm(g, torch.addmm(weight, b, a, alpha=s))
            else:
                grad_x = torch.mm(g, weight).addmm_(gb, a)
            grad_x = grad_x.view(ctx.in_shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = torch.mm(gb.t(), x2)
        if need_b:
            grad_b = torch.mm(g.t(), xa).mul_(s)  # d_out x r
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      a: torch.Tensor, b: torch.Tensor, scale: float, concat: bool = False,
                      join_backward: bool = False, fuse_grads: bool = False) -> torch.Tensor:
    """Autocast-aware entry to :class:`FusedLoRALinear`: under autocast every operand is cast to
    the autocast dtype once, as F.linear would (x once for both paths). The matmuls inside then
    see matching dtypes, so autocast leaves them alone; no context switch is needed, which
    matters at small batches where eager mode is bound by Python overhead per layer.
    ``concat``: the forward as one GEMM over [x, x A^T] (see :class:`FusedLoRALinear`);
    ``join_backward``: the backward's two GEMMs over the output gradient as one (:class:`JoinedDenseWeight`);
    ``fuse_grads``: A's and B's gradients from one pass over the output gradient (:class:`FusedGradDenseWeight`)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return FusedLoRALinear.apply(x.to(dtype), weight.to(dtype),
                                     None if bias is None else bias.to(dtype), a.to(dtype),
                                     b.to(dtype), scale, concat, join_backward, fuse_grads)
    dtype = weight.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    return FusedLoRALinear.apply(x, weight, bias, a.to(dtype), b.to(dtype), scale, concat, join_backward, fuse_grads)


def _is_nf4_linear(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def dispatch_base(module: nn.Module, name: str = "") -> Any:
    """Pick the weight accessor for a base layer: first match wins, as peft's ``dispatch_*``.

    NF4 comes first because bitsandbytes' ``Linear4bit`` subclasses ``nn.Linear``.
    """
    if _is_nf4_linear(module):
        from orca.adapters.qlora import NF4Weight  # lazy: bitsandbytes is optional

        return NF4Weight
    if isinstance(module, nn.Linear):
        return DenseWeight
    raise ValueError(f"cannot adapt module {name!r} of type {type(module).__name__}: supported base "
                     "layers are torch.nn.Linear and bitsandbytes.nn.Linear4bit (NF4)")


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
