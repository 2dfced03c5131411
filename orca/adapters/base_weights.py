"""Base-weight accessors: how a LoRA layer reads, writes and multiplies its frozen base weight.

One accessor per kind of base layer, chosen by :func:`dispatch_base` (first match wins, as peft's
``dispatch_*``): :class:`DenseWeight` for a plain ``nn.Linear`` (exact, and its LoRA forward is the
fused Function of ``orca.adapters.lora_forward``), :class:`NF4Weight` for bitsandbytes' 4-bit
``Linear4bit`` (QLoRA: read = dequantise, write = re-quantise). The subclasses of
:class:`DenseWeight` pin one forward form each; benchmarks time them against the default.
bitsandbytes is imported only by the NF4 functions: it is optional, and CUDA-only in practice.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from orca.adapters.lora_forward import fused_lora_linear, lora_forward_generic


class DenseWeight:
    """Read / write the frozen weight of a plain ``nn.Linear`` (exact, in its own dtype).

    Its LoRA forward is :class:`FusedLoRALinear` in one of two forms, chosen by ``concat``: the
    base GEMM plus an in-place rank-r update of its output, or one GEMM over [x, x A^T] against
    [W, s B]. ``None`` (the default) takes the one-GEMM form while torch.compile traces and the
    in-place form in eager mode. Why: compiled with CUDA graphs on one H200 (Swin-B, r = 8 ``blocks``,
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
    def lora_forward(cls, layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
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
    def lora_forward(layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
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


def _nf4_to_dense(weight: nn.Parameter) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks CPU weights for AVX512-BF16 inference; undo that to read them
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state)


def make_nf4(weight: torch.Tensor, blocksize: int, double_quant: bool, device: torch.device,
              module: nn.Module):
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=blocksize,
                              compress_statistics=double_quant, quant_type="nf4", module=module)
    return param.to(device)  # bitsandbytes quantises on the move to a device


class NF4Weight:
    """Weight accessor for a ``Linear4bit`` base: read = dequantise, write = re-quantise. Merging
    into NF4 is lossy (the merged weight is rounded to the 4-bit grid again), as in peft."""

    kind = "nf4"

    @staticmethod
    def get(base: nn.Module) -> torch.Tensor:
        return _nf4_to_dense(base.weight)

    @staticmethod
    def set(base: nn.Module, weight: torch.Tensor) -> None:
        old = base.weight
        new = make_nf4(weight.to(torch.float32), old.blocksize, old.compress_statistics,
                        old.device, base)
        base.weight = new
        base.quant_state = new.quant_state

    @classmethod
    def add_(cls, base: nn.Module, delta: torch.Tensor, alpha: float = 1.0) -> None:
        cls.set(base, cls.get(base).float() + alpha * delta.float())

    @staticmethod
    def lora_forward(layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """The 4-bit matmul is bitsandbytes' kernel, so only the generic composition applies."""
        return lora_forward_generic(layer, x, a, b, scale)


def _is_nf4_linear(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def dispatch_base(module: nn.Module, name: str = "") -> Any:
    """Pick the weight accessor for a base layer: first match wins, as peft's ``dispatch_*``.

    NF4 comes first because bitsandbytes' ``Linear4bit`` subclasses ``nn.Linear``.
    """
    if _is_nf4_linear(module):
        return NF4Weight
    if isinstance(module, nn.Linear):
        return DenseWeight
    raise ValueError(f"cannot adapt module {name!r} of type {type(module).__name__}: supported base "
                     "layers are torch.nn.Linear and bitsandbytes.nn.Linear4bit (NF4)")
