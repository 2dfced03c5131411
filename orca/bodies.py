"""The pretrained body: a timm Swin whose weights come from the hub, a local file, or nowhere.

Why three sources: hub weights (ImageNet-21k) are the paper's setting but need internet; a local
file serves air-gapped clusters and our own offline-pretrained fractal body (stage 0); random
weights are the control that shows pretraining matters. Whatever the source, the body's patch
embedding is detached from it and handed to the embedder, so the body starts at ``layers.0``.
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from orca.errors import READ_ERRORS, OrcaError, reading

ATTENTION_KINDS = ("auto", "sdpa", "bmm")  # auto: sdpa where timm's Swin offers it (V1), else the body's own
# The kernels sdpa may take for window attention: every one but cuDNN's. With Swin's float mask PyTorch
# prefers cuDNN when the mask needs no gradient (a frozen relative-position bias, i.e. LoRA) and the
# memory-efficient kernel when it does (full fine-tuning); on an H200 at batch 256 cuDNN's forward and
# backward took 51 ms per compiled step against 23 ms for the memory-efficient ones
# (results/bench/train_compile_sdpa_cudnn_b256_profile.md). Flash attention takes no float mask, so on a GPU
# this means the memory-efficient kernel; MATH stays as the fallback everywhere else.
SDPA_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
BODY_META_KEY = "orca_body"  # safetensors metadata key holding {"model": name, "kwargs": {...}}
# timm kwargs that set training noise, not the weights' shapes: a weight file is loaded whatever they are
# (stage 0 trains at timm's default stochastic depth, 0.1; stage 3 may switch it off).
REGULARISATION_KWARGS = ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


class WeightsError(OrcaError, RuntimeError):
    """A body's weights could not be found, read, or do not fit the configured variant."""


def create_body(name: str, weights: str = "none", hub_tag: str = "ms_in22k", weights_file: Optional[str] = None,
                img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Create a timm Swin body without classifier (``num_classes=0``) and load its weights.

    Args:
        name: timm model name, e.g. ``swin_base_patch4_window7_224``.
        weights: ``hub`` (timm pretrained ``name.hub_tag``), ``file`` (``weights_file``) or ``none``.
        img_size: input resolution of the body.
        kwargs: extra timm kwargs for reduced variants (``embed_dim``, ``depths``, ``num_heads``, ``window_size``).
    """
    if name not in timm.list_models("swin*"):
        raise ValueError(f"model.body={name!r} is not a timm Swin model; options include "
                         f"{', '.join(timm.list_models('swin_*window7_224'))}")
    kwargs = dict(kwargs, num_classes=0, img_size=img_size)
    if weights == "none":
        body = timm.create_model(name, pretrained=False, **kwargs)
        body.orca_weights = "none (random init)"
        return body
    if weights == "hub":
        try:
            body = timm.create_model(f"{name}.{hub_tag}", pretrained=True, **kwargs)
        except Exception as err:  # network errors come in many types (OSError, HF hub errors)
            raise WeightsError(
                f"could not load hub weights {name}.{hub_tag} ({type(err).__name__}: {err}). Offline? Use "
                f"model.weights=file model.weights_file=PATH with a local checkpoint, the offline fractal body "
                f"(configs/body_fractal.yaml), or model.weights=none") from None
        body.orca_weights = f"hub:{name}.{hub_tag}"
        return body
    if weights == "file":
        return load_body_file(name, weights_file, **kwargs)
    raise ValueError(f"model.weights={weights!r}: choose hub, file or none")


def set_attention(body: nn.Module, kind: str = "auto") -> str:
    """Compute the body's window attention as ``sdpa`` or ``bmm``; returns the kind it runs with.

    Why: timm computes Swin's window attention with explicit matmuls (q k^T, softmax, . v) and keeps
    ``F.scaled_dot_product_attention`` (the relative-position bias and the shift mask as its float
    mask) behind an "experimental" flag. Both are the same function; at 49 tokens per window the
    explicit matmuls are unaligned (N = 49) and run on slow generic GEMM kernels on Hopper
    (results/bench/train_compile_b256_profile.md), and the fused kernel also keeps no N x N
    attention matrix for backward: on an H200 sdpa is 1.04-1.20x faster for full fine-tuning, LoRA and
    peft alike, with 15% less peak memory at batch 256 (results/bench/train_eager_sdpa.md), so
    ``auto`` (the default ``model.attention``) takes it wherever the body has the switch. timm's Swin
    V2 has no such switch (cosine attention, explicit matmuls): ``auto`` and ``bmm`` leave it as it
    is, and ``sdpa`` is refused. A switch rather than a new attention module, so weights, state
    dicts and checkpoints stay timm's own. ``sdpa`` also keeps PyTorch off cuDNN's attention kernel,
    which it picks for a bias without gradient and which was 2x slower here (:data:`SDPA_BACKENDS`).
    """
    from timm.models.swin_transformer import WindowAttention

    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}: choose one of {', '.join(ATTENTION_KINDS)}")
    blocks = [m for m in body.modules() if isinstance(m, WindowAttention)]
    if not blocks:
        if kind == "sdpa":
            raise ValueError(f"attention='sdpa': {type(body).__name__} has no timm Swin (V1) WindowAttention "
                             f"to switch; use attention=auto or bmm")
        return "bmm"
    kind = "sdpa" if kind == "auto" else kind
    for m in blocks:
        m.fused_attn = kind == "sdpa"
        if kind == "sdpa":  # a bound method, so deepcopy and pickle rebind it to the copy
            m.forward = types.MethodType(_window_attention_without_cudnn, m)
        else:
            m.__dict__.pop("forward", None)
    return kind


def _window_attention_without_cudnn(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """timm's window attention with sdpa restricted to :data:`SDPA_BACKENDS` (traced by torch.compile)."""
    with sdpa_kernel(list(SDPA_BACKENDS)):
        return type(self).forward(self, *args, **kwargs)


def load_body_file(name: str, path: Optional[str], **kwargs: Any) -> nn.Module:
    """Build ``name`` and load a local checkpoint, refusing one made for another Swin variant."""
    if not path:
        raise WeightsError("model.weights=file needs model.weights_file=PATH")
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"body weights file not found: {file} (set model.weights_file, or run "
                           f"scripts/stage0_pretrain.sh to make the offline fractal body)")
    meta = read_body_meta(file)
    if meta is not None:
        if meta["model"] != name:
            raise WeightsError(f"{file} holds weights of {meta['model']}, but model.body={name!r}")
        ignored = ("num_classes", "img_size") + REGULARISATION_KWARGS
        saved = {k: _plain(v) for k, v in meta.get("kwargs", {}).items() if k not in ignored}
        given = {k: _plain(v) for k, v in kwargs.items() if k not in ignored}
        if saved != given:
            raise WeightsError(f"{file} was saved for a Swin with {saved}, but model.body_kwargs gives {given}; "
                               f"set model.body_kwargs to the checkpoint's values")
    body = timm.create_model(name, pretrained=False, **kwargs)
    state = load_state_file(file)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = _to_timm_layout(state, body)
    missing, unexpected = body.load_state_dict(state, strict=False)
    if _size_mismatch := [k for k in missing if not k.startswith("head.")]:
        raise WeightsError(f"{file} does not fit {name} {kwargs}: missing {len(_size_mismatch)} tensors, "
                           f"e.g. {_size_mismatch[:3]}")
    if unexpected:
        raise WeightsError(f"{file} does not fit {name}: unexpected tensors, e.g. {unexpected[:3]}")
    body.orca_weights = f"file:{file}"
    return body


def _to_timm_layout(state: Dict[str, torch.Tensor], body: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Convert only checkpoints in the original Swin layout (PatchMerging at the end of a stage).

    Why not always timm's ``checkpoint_filter_fn``: before timm 1.0.31 it tells the layouts apart by
    the classifier, so a headless file in timm's own layout -- every body we save -- had its
    ``layers.N.downsample`` keys shifted to N + 1 (seen with timm 1.0.29 on the GPU image).
    Our files are in timm's layout and only lose the buffers that timm rebuilds.
    """
    if "layers.0.downsample.reduction.weight" in state:  # Microsoft's layout: timm converts it
        return timm.models.swin_transformer.checkpoint_filter_fn(state, body)
    return {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}


def load_state_file(file: Path) -> Dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file without unpickling arbitrary objects."""
    fix = "re-export it, or re-download it if it came from elsewhere"
    if file.suffix == ".safetensors":
        with reading(file, "a safetensors weights file", fix, READ_ERRORS + (SafetensorError,)):
            return load_file(str(file))
    with reading(file, "a torch weights file", fix):
        state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def read_body_meta(file: Path) -> Optional[Dict[str, Any]]:
    """The ``{"model", "kwargs"}`` record stage 0 writes into a safetensors header (None if absent)."""
    if file.suffix != ".safetensors":
        return None
    with reading(file, "a safetensors weights file", "re-export it (python -m orca.pretrain export)",
                 READ_ERRORS + (SafetensorError,)):
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        return json.loads(meta[BODY_META_KEY]) if BODY_META_KEY in meta else None


def save_body(body: nn.Module, name: str, kwargs: Dict[str, Any], path: str) -> None:
    """Save body weights as safetensors with the exact timm config in the header (stage 0)."""
    state = {k: v.detach().contiguous().cpu() for k, v in body.state_dict().items() if not k.startswith("head.")}
    meta = {BODY_META_KEY: json.dumps({"model": name, "kwargs": {k: _plain(v) for k, v in kwargs.items()}})}
    tmp = f"{path}.tmp"
    save_file(state, tmp, metadata=meta)
    Path(tmp).replace(path)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
