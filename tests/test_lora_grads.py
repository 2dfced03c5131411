"""LoRA's factor gradients from one pass over the output gradient (orca/adapters/lora_grads.py):
the same forward and gradients as the plain path, eager and compiled, and the Triton kernel itself
(run by Triton's interpreter on the CPU, in a subprocess because the interpreter is chosen when
Triton is imported)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from orca.adapters import lora_forward
from orca.adapters.base_weights import FusedGradDenseWeight
from orca.adapters.lora import LoRALinear
from orca.adapters.lora_grads import lora_factor_grads, reference_factor_grads, triton

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def pair(d_in, d_out, r, bias, dropout, monkeypatch=None):
    """Two identical LoRA layers (B made non-zero, so every gradient is), plain and fused."""
    torch.manual_seed(d_in * 100 + r)
    base = nn.Linear(d_in, d_out, bias=bias)
    plain = LoRALinear(base, r, alpha=2 * r, dropout=dropout, name="plain")
    with torch.no_grad():
        plain.lora_B.normal_()
    fused = LoRALinear(nn.Linear(d_in, d_out, bias=bias), r, alpha=2 * r, dropout=dropout, name="fused")
    fused.load_state_dict(plain.state_dict())
    fused.weight_access = FusedGradDenseWeight
    return plain, fused


def grads(layer, x, seed=0):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask in both layers
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("d_in, d_out, r, tokens, bias, dropout", [
    (16, 48, 1, (4, 49), True, 0.0),    # qkv-like, rank 1, many tokens
    (32, 32, 4, (2, 60), False, 0.0),   # no bias
    (24, 96, 8, (3, 40), True, 0.0),    # fc1-like
    (64, 16, 8, (2, 5), True, 0.0),     # fewer tokens than outputs: the plain path (needs g s B for dL/dx)
    (16, 48, 4, (4, 49), True, 0.1),    # dropout: LoRA's input differs from the base's (generic path)
])
def test_fused_factor_grads_match_the_plain_path(d_in, d_out, r, tokens, bias, dropout, monkeypatch):
    plain, fused = pair(d_in, d_out, r, bias, dropout)
    x = torch.randn(*tokens, d_in)
    want = grads(plain, x)
    calls = []
    monkeypatch.setattr(lora_forward, "lora_factor_grads", lambda *a: calls.append(a) or lora_factor_grads(*a))
    got = grads(fused, x)
    for w, g, what in zip(want, got, ("output", "dL/dx", "dL/dA", "dL/dB")):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=what)
    # the fused op ran exactly where it applies: enough tokens, and no dropout (the generic path)
    assert len(calls) == (1 if dropout == 0 and tokens[0] * tokens[1] >= d_out else 0)


def test_fused_factor_grads_under_torch_compile():
    plain, fused = pair(16, 48, 4, True, 0.0)
    x = torch.randn(4, 49, 16)
    want = grads(plain, x)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="inductor", fullgraph=True)
    for step in range(2):  # the second call reuses the compiled graph
        fused.zero_grad(set_to_none=True)
        got = grads(compiled, x)
        for w, g, what in zip(want, got, ("output", "dL/dx", "dL/dA", "dL/dB")):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{what}, call {step}")


def test_reference_is_the_chain_rule():
    """The op against autograd of (x A^T) B^T: the definition the kernel must meet."""
    torch.manual_seed(0)
    x, a, b = torch.randn(50, 12), torch.randn(3, 12, requires_grad=True), torch.randn(20, 3, requires_grad=True)
    g = torch.randn(50, 20)
    (0.5 * (x @ a.t()) @ b.t()).backward(g)
    grad_a, grad_b = lora_factor_grads(g, x, x @ a.detach().t(), b.detach(), 0.5)
    torch.testing.assert_close(grad_a, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, b.grad, rtol=1e-5, atol=1e-5)


KERNEL_CHECK = textwrap.dedent("""\
    import torch
    from orca.adapters.lora_grads import reference_factor_grads, triton_factor_grads
    torch.manual_seed(0)
    for n, d_in, d_out, r, programs in [(200, 24, 72, 8, 3), (130, 16, 40, 1, 0), (64, 32, 64, 5, 1)]:
        g, x, b = torch.randn(n, d_out), torch.randn(n, d_in), torch.randn(d_out, r)
        xa = x @ torch.randn(r, d_in).t()
        want = reference_factor_grads(g, x, xa, b, 0.75)
        got = triton_factor_grads(g, x, xa, b, 0.75, block_n=32, block_d=32, programs=programs)
        for w, k in zip(want, got):
            assert k.shape == w.shape and k.dtype == w.dtype, (k.shape, w.shape)
            torch.testing.assert_close(k, w, rtol=1e-4, atol=1e-4)
    print("kernel ok")
    """)


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter():
    """The kernel's indexing, masks (rows, columns and ranks that do not fill a block), the
    row-range split and the atomic sum, on the CPU through TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "kernel ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda(dtype):
    torch.manual_seed(0)
    n, d_in, d_out, r = 3 * 3136 + 17, 128, 384, 8
    g, x, b = (torch.randn(*s, device="cuda", dtype=dtype) for s in ((n, d_out), (n, d_in), (d_out, r)))
    xa = x @ torch.randn(r, d_in, device="cuda", dtype=dtype).t()
    want = reference_factor_grads(g.double(), x.double(), xa.double(), b.double(), 2.0)
    got = lora_factor_grads(g, x, xa, b, 2.0)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for w, k in zip(want, got):
        assert k.dtype == dtype
        torch.testing.assert_close(k.double(), w, rtol=tol, atol=tol * w.abs().max().item())
