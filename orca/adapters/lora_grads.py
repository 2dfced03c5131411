"""The gradients of LoRA's factors with one pass over the output gradient (a Triton kernel on CUDA).

A LoRA layer h = x W^T + s (x A^T) B^T has, per step, two gradients whose inputs are full-size
activations while their outputs are tiny::

    dL/dB = s g^T (x A^T)        (d_out x r, reduces g over the N tokens)
    dL/dA = (s g B)^T x          (r x d_in, needs the N x r product s g B first)

Done as plain GEMMs, g (N x d_out) is read twice (for s g B and for g^T (x A^T)) and x once: three
memory-bound passes with thin outputs that cuBLAS runs well below bandwidth, where the frozen
body's own backward makes none. :func:`lora_factor_grads` reads g once: each program of
:func:`_g_pass` loads a tile of g and produces both its share of s g B (added into an fp32 N x r
buffer) and its partial g^T (x A^T) (summed over programs afterwards, no atomics on it), then one
GEMM (s g B)^T x reads x once. On the CPU, and without Triton, it is the plain GEMMs.

It is a ``torch.library`` custom op, so torch.compile keeps it whole (Inductor would not fuse two
GEMMs with different reduction axes itself) and CUDA graphs can capture it. It is not the default:
``orca.adapters.base_weights.FusedGradDenseWeight`` uses it, ``scripts/bench_train.py --methods lora_fused``
times it.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

try:  # Triton ships with CUDA builds of PyTorch; elsewhere the op falls back to plain GEMMs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton
    triton = None


if triton is not None:
    @triton.jit
    def _g_pass(g_ptr, xa_ptr, sb_ptr, gb_ptr, part_ptr, n_rows, d_out, rank, rows_per_prog,
                stride_g, stride_xa, stride_sb, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr):
        """Program (i, j): rows [i rows_per_prog, (i + 1) rows_per_prog), output columns block j.
        gb[rows] += g[rows, cols] @ sB[cols] (atomic: the column blocks of one row meet there);
        part[i, cols] = g[rows, cols]^T @ xa[rows] (its own slice, summed over i by the caller)."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, R)
        mask_d = offs_d < d_out
        mask_r = offs_r < rank
        sb = tl.load(sb_ptr + offs_d[:, None] * stride_sb + offs_r[None, :],
                     mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        acc = tl.zeros((BLOCK_D, R), dtype=tl.float32)
        row0 = pid_n * rows_per_prog
        for start in range(row0, tl.minimum(row0 + rows_per_prog, n_rows), BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_rows
            g = tl.load(g_ptr + offs_n[:, None] * stride_g + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            xa = tl.load(xa_ptr + offs_n[:, None] * stride_xa + offs_r[None, :],
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(g), xa, input_precision="ieee")
                gb = tl.dot(g, sb, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g), xa)
                gb = tl.dot(g, sb)
            tl.atomic_add(gb_ptr + offs_n[:, None] * rank + offs_r[None, :], gb,
                          mask=mask_n[:, None] & mask_r[None, :])
        tl.store(part_ptr + pid_n * d_out * R + offs_d[:, None] * R + offs_r[None, :], acc,
                 mask=mask_d[:, None] & mask_r[None, :])


def triton_factor_grads(g: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, b: torch.Tensor,
                        scale: float, block_n: int = 64, block_d: int = 64,
                        programs: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dB) through :func:`_g_pass`; 2-D contiguous-row operands. ``programs``: how many
    row ranges to split N into (0: about four programs per multiprocessor in all)."""
    n, d_out = g.shape
    rank = b.shape[1]
    R = max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16
    sb = (b * scale).to(g.dtype).contiguous()
    d_blocks = triton.cdiv(d_out, block_d)
    if not programs:
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 8
        programs = max(1, min(triton.cdiv(n, block_n), (4 * sms) // d_blocks))
    rows_per_prog = triton.cdiv(triton.cdiv(n, programs), block_n) * block_n
    n_progs = triton.cdiv(n, rows_per_prog)
    gb = torch.zeros(n, rank, device=g.device, dtype=torch.float32)  # only the real ranks, not R's padding
    part = torch.empty(n_progs, d_out, R, device=g.device, dtype=torch.float32)
    _g_pass[(n_progs, d_blocks)](g, xa, sb, gb, part, n, d_out, rank, rows_per_prog,
                                 g.stride(0), xa.stride(0), sb.stride(0), R=R, BLOCK_N=block_n, BLOCK_D=block_d,
                                 IEEE=g.dtype == torch.float32)
    grad_b = part.sum(0)[:, :rank].mul_(scale).to(g.dtype)
    grad_a = torch.mm(gb.to(x.dtype).t(), x)
    return grad_a, grad_b


def reference_factor_grads(g: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, b: torch.Tensor,
                           scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain GEMMs (what ``FusedLoRALinear``'s backward does without this op)."""
    gb = torch.mm(g, b * scale)
    return torch.mm(gb.t(), x), torch.mm(g.t(), xa).mul_(scale)


@torch.library.custom_op("orca::lora_factor_grads", mutates_args=())
def lora_factor_grads(g: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, b: torch.Tensor,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dB) of a LoRA layer from the output gradient g (N x d_out), its input x
    (N x d_in), x A^T (N x r) and B (d_out x r): the Triton kernel on CUDA, plain GEMMs elsewhere."""
    if g.is_cuda and triton is not None:
        return triton_factor_grads(g.contiguous(), x, xa.contiguous(), b, scale)
    return reference_factor_grads(g, x, xa, b, scale)


@lora_factor_grads.register_fake
def _(g, x, xa, b, scale):
    return x.new_empty(b.shape[1], x.shape[1]), g.new_empty(g.shape[1], b.shape[1])


@register_flop_formula(torch.ops.orca.lora_factor_grads)
def _flops(g_shape, x_shape, xa_shape, b_shape, *args, **kwargs) -> int:
    """The plain GEMMs' multiply-adds (g s B, (g s B)^T x, g^T (x A^T)), so torch's FLOP counter and
    MFU figures count this op as what it replaces."""
    (n, d_out), d_in, rank = g_shape, x_shape[1], b_shape[1]
    return 2 * n * rank * (2 * d_out + d_in)
