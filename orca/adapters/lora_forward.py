"""The LoRA forward pass h = W0 x + bias + s B A x: generic (any base layer) and fused (dense base).

:func:`lora_forward_generic` composes the base layer's own forward with two small matmuls, which
works for any base (an NF4 ``Linear4bit`` included). :class:`FusedLoRALinear` is an autograd
Function for a dense W with a hand-written backward that skips full-size passes autograd would
make; :func:`fused_lora_linear` is its autocast-aware entry. The accessors of
``orca.adapters.base_weights`` pick between them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from orca.adapters.lora_grads import lora_factor_grads


def lora_forward_generic(layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
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
