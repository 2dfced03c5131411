"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on top of a
frozen base whose Linear weights are stored as 4-bit NormalFloat (NF4), via bitsandbytes.

Settings follow the paper (Sec. 3): NF4 with block size 64; double quantisation of the fp32 block
scales (8-bit, block 256), which bitsandbytes calls ``compress_statistics``; bf16 compute; paged
AdamW optionally (``train.optimizer=paged_adamw``, ``orca.adapters.optim.build_optimizer``).

Every Linear of the body is quantised (the paper quantises the whole base model), adapted or not;
LayerNorms, biases, relative-position tables and the embedder / head stay in their dtype.

No silent fallback: before quantising, :func:`require_bitsandbytes` runs a tiny NF4 round trip and
matmul on the body's device and raises a RuntimeError naming the device, the bitsandbytes version
and the cause if it fails. A run configured as QLoRA is therefore always a quantised run. And no
silently wrong weights: :func:`quantize_linears` reads every quantised weight back and checks it
against NF4's error bound before it replaces the layer. (bitsandbytes 0.50.2's CPU dequantisation
was seen to fail that bound on an AVX-512 CPU whenever a 64-weight block spans two rows of W, i.e.
``in_features`` not a multiple of 64: relative RMS error 0.40 instead of NF4's 0.09.)
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from orca.adapters.base_weights import NF4Weight, make_nf4
from orca.adapters.lora import LoRAMethod

NF4_BLOCKSIZE = 64  # QLoRA Sec. 3: block size 64 for the weights
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_bitsandbytes(device: torch.device) -> Any:
    """Import bitsandbytes and check that NF4 quantisation and the 4-bit matmul run on ``device``.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        RuntimeError: bitsandbytes is missing or cannot run NF4 on ``device``.
    """
    device = torch.device(device)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as err:  # ImportError, or a broken native library raising at import
        raise RuntimeError(f"method 'qlora' needs bitsandbytes, which failed to import ({err!r}); "
                           "install it (pip install bitsandbytes) or use method 'lora'") from err
    if device.type == "meta":
        raise RuntimeError("method 'qlora' cannot quantise a body on the meta device; materialise "
                           "the weights first")
    try:
        w = torch.linspace(-1, 1, 64 * 4, device=device).reshape(4, 64)
        q, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                      compress_statistics=True)
        back = bnbf.dequantize_4bit(q, state)
        out = bnb.matmul_4bit(torch.ones(2, 64, device=device, dtype=torch.bfloat16), q.t(),
                              quant_state=state)
        if back.shape != w.shape or out.shape != (2, 4) or not torch.isfinite(out).all():
            raise RuntimeError(f"unexpected NF4 round-trip result shapes {tuple(back.shape)}, "
                               f"{tuple(out.shape)}")
    except Exception as err:
        raise RuntimeError(f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run NF4 "
                           f"quantisation on device {device} ({type(err).__name__}: {err}). QLoRA "
                           "has no fallback: run on a CUDA GPU or use method 'lora'") from err
    return bnb


def quantize_linears(body: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                     double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> Dict[str, nn.Module]:
    """Replace every ``nn.Linear`` of ``body`` by a frozen NF4 ``bitsandbytes.nn.Linear4bit``.

    The quantisation runs on the device the weights are on (CPU or CUDA). Biases are kept. Every
    quantised weight is read back and checked against :func:`nf4_error_bound` before any layer is
    replaced, so a failed check leaves the body unchanged.

    Returns:
        ``{name: Linear4bit}``.

    Raises:
        RuntimeError: bitsandbytes cannot run NF4 on the body's device, or reads a quantised weight
            back outside NF4's error bound (the message names the module).
    """
    first = next(body.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    bnb = require_bitsandbytes(device)
    out: Dict[str, nn.Module] = {}
    names = [n for n, m in body.named_modules()
             if isinstance(m, nn.Linear) and type(getattr(m, "weight", None)).__name__ != "Params4bit"]
    for name in names:
        dense = body.get_submodule(name)
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="meta")
        q.weight = make_nf4(dense.weight.data, blocksize, double_quant, dense.weight.device, q)
        q.quant_state = q.weight.quant_state
        _check_dequantised(name, dense.weight.data, NF4Weight.get(q), blocksize, double_quant, bnb)
        if dense.bias is not None:
            q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        q.train(dense.training)
        out[name] = q
    for name, q in out.items():
        parent_name, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent_name) if parent_name else body, child, q)
    return out


def _check_dequantised(name: str, weight: torch.Tensor, back: torch.Tensor, blocksize: int,
                       double_quant: bool, bnb: Any) -> None:
    """Raise if bitsandbytes reads the NF4 weight of ``name`` back outside NF4's error bound."""
    w = weight.detach().float()
    diff = back.float().to(w.device) - w
    err = diff.abs()
    bound = nf4_error_bound(w, blocksize, double_quant)
    if bool((err <= bound).all()):
        return
    rel = (diff.norm() / w.norm().clamp_min(1e-30)).item()
    worst = int((err / bound.clamp_min(1e-30)).reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), weight.shape))
    spans = (f"; its in_features {weight.shape[1]} is not a multiple of the block size {blocksize}, "
             "so blocks span rows of W, which bitsandbytes' CPU kernel has been seen to get wrong"
             if weight.shape[1] % blocksize else "")
    raise RuntimeError(
        f"bitsandbytes {getattr(bnb, '__version__', '?')} dequantises the NF4 weight of {name!r} "
        f"(shape {tuple(weight.shape)}, on {weight.device}) wrongly: {int((err > bound).sum())} elements "
        f"past NF4's error bound, the worst at {where} by {err.reshape(-1)[worst].item():.3g} where the "
        f"bound is {bound.reshape(-1)[worst].item():.3g}; relative RMS error {rel:.2f} (NF4: about "
        f"0.09){spans}. QLoRA has no fallback: run it on a CUDA GPU or use method 'lora'")


def base_weight_bytes(module: nn.Module) -> int:
    """Bytes held by the Linear weights of ``module``: packed 4-bit data plus the quantisation
    state (block scales, nested scales, code books) for NF4 layers; ``numel * itemsize`` else."""
    total = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Linear) or w is None:
            continue
        total += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:
            for t in _state_tensors(state):
                total += t.numel() * t.element_size()
    return total


def _state_tensors(state: Any):
    for attr in ("absmax", "code"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            yield t
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _state_tensors(nested)
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        yield offset


def nf4_error_bound(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE,
                    double_quant: bool = True) -> torch.Tensor:
    """Per-element bound on |dequant(quant(W)) - W| under bitsandbytes' NF4.

    An element is rounded to the nearest of NF4's 16 levels on [-1, 1] times its block's absmax
    ``a``: an error of at most half the widest gap between levels (0.139, between 0.723 and 1)
    times ``a``. Double quantisation then stores ``a`` itself in 8 bits (the signed dynamic code over
    ``a - mean(a)``, in groups of 256 blocks scaled by the group's largest deviation), and the element
    is read back as level x stored ``a``: the bound adds the stored ``a``'s own error (a level is at
    most 1 in size), :func:`_absmax_storage_error`. A flat 5% allowance for it held on CPU test
    weights and failed one Swin-B layer on a GPU by 0.2%.
    """
    import bitsandbytes.functional as bnbf

    levels = bnbf.get_4bit_type("nf4", device="cpu").float().sort().values
    half_gap = ((levels[1:] - levels[:-1]).max() / 2).item()
    flat = weight.detach().float().reshape(-1)  # on the weight's device: quantize_linears checks every layer
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    per_block = absmax * half_gap
    if double_quant:
        per_block = per_block + _absmax_storage_error(absmax, bnbf)
    bound = (per_block * (1 + 1e-5)).unsqueeze(1).expand_as(blocks).reshape(-1)[: flat.numel()]
    return bound.reshape(weight.shape)


def _absmax_storage_error(absmax: torch.Tensor, bnbf: Any, group: int = 256) -> torch.Tensor:
    """Bound on |stored absmax - absmax| under bitsandbytes' nested (double) quantisation, which
    stores (a - mean(a)) / s in the signed 8-bit dynamic code, s the largest |a - mean(a)| of each
    group of 256 blocks: the code's widest gap (0.014) times s. Not half of it: the kernel picks a
    bracketing code value but not always the nearest (measured: up to 0.51 of the local gap), and
    near zero, where the code's gaps are ~1e-6, it can land a few values away."""
    code = bnbf.create_dynamic_map().to(absmax.device).float().sort().values
    widest = (code[1:] - code[:-1]).max()
    dev = absmax - absmax.mean()
    pad = (-dev.numel()) % group
    scale = torch.nn.functional.pad(dev, (0, pad)).reshape(-1, group).abs().amax(dim=1, keepdim=True)
    return (widest * scale).expand(-1, group).reshape(-1)[: absmax.numel()]


class QLoRAMethod(LoRAMethod):
    """LoRA over an NF4-quantised frozen body (adapters and trainable parts stay in float)."""

    name = "qlora"

    def prepare_base(self, body: nn.Module) -> None:
        quantize_linears(body, compute_dtype=DTYPES[self.cfg.qlora_compute_dtype],
                         double_quant=self.cfg.qlora_double_quant)
