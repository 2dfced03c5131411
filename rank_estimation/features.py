"""Per-layer features of the Swin body: forward hooks at the embedder and at every block's output.

Stage 2 compares two streams through one frozen body, layer by layer:

    source: source images -> the body's pretrained patch embedding -> body blocks
    target: target inputs -> the model's target embedder (stage 1's when model.embedder_from is
            set, else the initial one) -> the same body blocks

Layer names are ``"embed"`` (the embedder output, before any block) and ``layers.{i}.blocks.{j}``
(timm's module names), so a per-block gap keys directly onto the block's Linear modules
(``rank_estimation.allocate.expand``) and on into stage 3's rank map.

Why hooks and not ``forward_intermediates``: timm's intermediates are per stage, not per block,
and hooks work on any body laid out as ``body.layers[i].blocks[j]`` (the test stand-ins too).
Why pooling inside the hook: a block's token grid at 224 px is up to 56 x 56 x 128 per image;
keeping only the mean (ORCA's feature, ``pool="mean"``) or a few sampled tokens per image makes
5,000 images x 24 blocks a few hundred MB instead of tens of GB.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from orca.runtime import AMP_MODES, autocast_for
from datasets.progress import Progress
from rank_estimation.config import POOLS

__all__ = ["EMBED", "POOLS", "block_names", "layer_names", "resolve_layers", "capture_block_features"]

#: Name of the embedder-output layer (the patch tokens before the first block).
EMBED = "embed"

Inputs = Union[Tensor, torch.utils.data.Dataset, Iterable]


def block_names(body: nn.Module) -> List[str]:
    """``layers.{i}.blocks.{j}`` of every block of a Swin-like body, in forward order.

    Args:
        body: a module with ``body.layers[i].blocks[j]`` (timm SwinTransformer, v1 or v2).
    """
    stages = getattr(body, "layers", None)
    if stages is None or not all(hasattr(stage, "blocks") for stage in stages):
        raise ValueError(f"{type(body).__name__} has no body.layers[i].blocks[j] layout; per-block "
                         f"features need a timm Swin body (or a module laid out like one)")
    return [f"layers.{i}.blocks.{j}" for i, stage in enumerate(stages) for j in range(len(stage.blocks))]


def layer_names(body: nn.Module) -> List[str]:
    """Every layer :func:`capture_block_features` can hook: ``"embed"`` then the blocks."""
    return [EMBED, *block_names(body)]


def resolve_layers(body: nn.Module, layers: Optional[Sequence[str]] = None) -> List[str]:
    """Check requested layer names against the body (None = all) and return them in forward order.

    Raises:
        ValueError: an empty request, or a name that is not a layer (listing the valid names).
    """
    valid = layer_names(body)
    if layers is None:
        return valid
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer, or pass None for all")
    for name in layers:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=2)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"layer {name!r} does not exist in this body{hint} (layers: {', '.join(valid)})")
    order = {n: i for i, n in enumerate(valid)}
    return sorted(set(layers), key=order.__getitem__)


def _batches(inputs: Inputs, batch_size: int) -> Tuple[Iterator[Tensor], Optional[int]]:
    """Input batches ``[b, C, H, W]`` from a tensor, a map-style dataset of ``(x, y)`` / ``x``, or batches."""
    if torch.is_tensor(inputs):
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise ValueError(f"inputs is empty or not batched (shape {tuple(inputs.shape)}): the feature set "
                             f"needs at least one sample [N, C, H, W]")
        return (inputs[i:i + batch_size] for i in range(0, inputs.shape[0], batch_size)), inputs.shape[0]
    if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__len__"):
        if len(inputs) == 0:
            raise ValueError("inputs is an empty dataset: the feature set needs at least one sample")
        loader = torch.utils.data.DataLoader(inputs, batch_size=batch_size, shuffle=False)
        return (_first(batch) for batch in loader), len(inputs)
    return (_first(batch) for batch in inputs), None


def _first(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class _Stop(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the body is not needed."""


class _Pooler:
    """Turns one layer's output ``[B, ..., C]`` (tokens last-but-one) into feature rows."""

    def __init__(self, pool: str, tokens_per_sample: int, seed: int):
        self.pool, self.k, self.seed = pool, tokens_per_sample, seed
        self.calls = 0

    def __call__(self, out: Tensor, layer_index: int) -> Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0]
        tokens = out.flatten(1, -2).float()  # [B, T, C]; timm Swin blocks are NHWC
        if self.pool == "mean":
            return tokens.mean(1)
        b, t, c = tokens.shape
        if self.k and self.k < t:
            # seeded by (seed, layer, batch): the same call order gives the same tokens on any device
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_index * 10_007 + self.calls)
            idx = torch.rand(b, t, generator=gen).argsort(1)[:, :self.k].to(tokens.device)
            tokens = tokens.gather(1, idx[..., None].expand(b, self.k, c))
        return tokens.reshape(-1, c)


@torch.no_grad()
def capture_block_features(model: nn.Module, inputs: Inputs, *, embedder: Optional[nn.Module] = None,
                           layers: Optional[Sequence[str]] = None, pool: str = "mean",
                           device: Union[str, torch.device, None] = None, batch_size: int = 64,
                           amp: str = "auto", tokens_per_sample: int = 16, seed: int = 0,
                           out_device: Union[str, torch.device] = "cpu",
                           desc: Optional[str] = None) -> Dict[str, Tensor]:
    """Features at the embedder output and every Swin block, without autograd, batched.

    Args:
        model: an :class:`orca.model.ORCAModel` (its ``.embedder`` and ``.body`` are used) or a bare
            body (then ``embedder`` maps the inputs to tokens, or, when None, the body's own
            ``patch_embed`` output is the ``"embed"`` layer).
        inputs: ``[N, C, H, W]`` tensor, a map-style dataset yielding ``(x, y)`` or ``x``, or an
            iterable of batches (e.g. a DataLoader).
        embedder: replaces ``model.embedder`` (stage 2's source stream: the pretrained patch
            embedding in front of the same body).
        layers: names from :func:`layer_names` (None = all); unknown names raise.
        pool: ``"mean"`` (one token-averaged row per input) or ``"tokens"`` (token rows).
        device: where the forward runs (None = where the body's parameters are).
        batch_size: inputs per forward pass (tensor and dataset inputs).
        amp: ``"auto"`` (bf16 autocast on CUDA, full precision on CPU), ``"bf16"`` or ``"off"``.
            Pooling is always done in float32.
        tokens_per_sample: with ``pool="tokens"``, seeded random tokens kept per input and layer
            (0 = all tokens).
        seed: seed of that token subsample.
        out_device: where the returned features live.
        desc: progress label (None = no progress report).

    Returns:
        layer name -> ``[N, C_layer]`` (mean) or ``[N * tokens, C_layer]`` (tokens) float32, in
        forward order.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not allowed; choose one of {POOLS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if isinstance(tokens_per_sample, bool) or not isinstance(tokens_per_sample, int) or tokens_per_sample < 0:
        raise ValueError(f"tokens_per_sample={tokens_per_sample!r} must be an integer >= 0 (0 = all)")
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not allowed; choose one of {AMP_MODES}")
    body = model.body if hasattr(model, "body") else model
    if embedder is None:
        embedder = getattr(model, "embedder", None) if hasattr(model, "body") else None
    wanted = resolve_layers(body, layers)
    if device is None:
        device = next(iter(body.parameters()), torch.empty(0)).device
    device = torch.device(device)
    autocast = autocast_for(amp, device)

    modules: Dict[str, nn.Module] = {}
    for name in wanted:
        if name != EMBED:
            modules[name] = body.get_submodule(name)
        elif embedder is not None:
            modules[name] = embedder
        elif hasattr(body, "patch_embed"):
            modules[name] = body.patch_embed
        else:
            raise ValueError(f"layer {EMBED!r} needs an embedder: pass embedder= or use a body with patch_embed")
    index = {n: i for i, n in enumerate(layer_names(body))}
    last = wanted[-1]
    pooler = _Pooler(pool, tokens_per_sample, seed)
    rows: Dict[str, List[Tensor]] = {name: [] for name in wanted}
    # mean rows are small: keep them on the device (no per-batch sync); token rows go out per batch
    keep = device if pool == "mean" else torch.device(out_device)

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            rows[name].append(pooler(output, index[name]).to(keep))
            if name == last:
                raise _Stop
        return hook

    batches, total = _batches(inputs, batch_size)
    trained = {m: m.training for m in (body, embedder) if m is not None}
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in wanted]
    count = 0
    bar = Progress(total=total, desc=desc, unit="img", leave=False, enabled=bool(desc))
    try:
        for m in trained:
            m.eval()
        for x in batches:
            x = x.to(device, non_blocking=True)
            with autocast():
                try:
                    tokens = embedder(x) if embedder is not None else x
                    body.forward_features(tokens)
                except _Stop:
                    pass
            pooler.calls += 1
            count += x.shape[0]
            bar.update(x.shape[0])
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for m, mode in trained.items():
            m.train(mode)
    if count == 0:
        raise ValueError("inputs yielded no batches: the feature set is empty")
    out: Dict[str, Tensor] = {}
    for name in wanted:
        feats = torch.cat(rows[name]).to(out_device)
        bad = int((~torch.isfinite(feats)).any(1).sum())
        if bad:
            raise FloatingPointError(f"features at layer {name!r} hold NaN/inf in {bad} of {feats.shape[0]} rows "
                                     f"(amp={amp!r} on {device.type}); check the inputs, or retry with amp='off'")
        out[name] = feats
    return out
