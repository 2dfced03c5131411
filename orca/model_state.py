"""What a checkpoint keeps of a model: every tensor a run can change, and of a frozen body only a digest.

Why: a sweep of short LoRA runs on a 12M-parameter body wrote the 48 MB body into each run's
``ckpt/last.pt`` and ``ckpt/best.pt`` at every epoch, although it never changes and is already on
disk in the file (or hub cache) that the run's ``config.yaml`` names; writing those copies was a fifth
of a packed sweep's time. So a checkpoint holds under ``model`` the trained tensors, the embedder,
the head and every buffer, and under ``frozen_body`` the names of the body parameters it left out
and a SHA-256 of their values. Loading builds the model from the run's config first (which loads
the body), checks the digest of its frozen body against the checkpoint's, and fills in the rest.

The body is written in full where it cannot be rebuilt from the config or changes during training:
a random body (``model.weights=none``), a method that trains it (``full``) or moves its frozen
weights in place (Delta-LoRA, :attr:`orca.adapters.base.AdapterMethod.changes_frozen_body`).
Checkpoints with the whole model (those, and older runs) load as they always did.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from orca.runs import CheckpointMismatch

#: The checkpoint key of the reference that replaces the frozen body's tensors.
FROZEN_KEY = "frozen_body"


def body_rebuildable(weights: str, method: Any) -> bool:
    """Whether a run's frozen body can be rebuilt from its config: weights from a file or the hub
    (``model.weights``), and a method (:class:`orca.adapters.base.AdapterMethod`) that keeps them."""
    return weights != "none" and not method.changes_frozen_body


def frozen_body_names(model: nn.Module, rebuildable: bool) -> List[str]:
    """State-dict names of the body parameters a checkpoint leaves out: frozen ones, when the body
    is ``rebuildable`` from the config (weights from a file or the hub, a method that keeps them)."""
    if not rebuildable:
        return []
    return [f"body.{name}" for name, p in model.body.named_parameters() if not p.requires_grad]


def _tensors(model: nn.Module, names: List[str]) -> List[torch.Tensor]:
    state = dict(model.named_parameters())
    return [state[name] for name in names]


def frozen_digest(model: nn.Module, names: List[str]) -> str:
    """SHA-256 of the values (dtype, shape, bytes; in state-dict order, not by name) of ``names``.

    Not by name: a LoRA run keeps a Linear's weight under ``base_layer`` and a head-only run does
    not, so runs of one sweep on one body file agree. Computed once per model and kept while no
    in-place write touches those tensors (their version counters), so a pack's runs, which share
    the body's tensors, and every later checkpoint pay nothing.
    """
    tensors = _tensors(model, names)
    versions = tuple(t._version for t in tensors)
    cached: Optional[Tuple[Tuple[str, ...], Tuple[int, ...], Tuple[int, ...], str]] = getattr(model, "_frozen_digest", None)
    ptrs = tuple(t.data_ptr() for t in tensors)
    if cached is not None and cached[0] == tuple(names) and cached[1] == versions and cached[2] == ptrs:
        return cached[3]
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digest = h.hexdigest()
    model._frozen_digest = (tuple(names), versions, ptrs, digest)
    return digest


def share_digest(models: List[nn.Module], names_of: List[List[str]]) -> None:
    """Give runs whose frozen tensors are the same tensors (a pack's runs) the digest of the first."""
    if not models or not names_of[0]:
        return
    digest = frozen_digest(models[0], names_of[0])
    for model, names in zip(models[1:], names_of[1:]):
        if not names:
            continue
        tensors = _tensors(model, names)
        model._frozen_digest = (tuple(names), tuple(t._version for t in tensors),
                                tuple(t.data_ptr() for t in tensors), digest)


def model_checkpoint(model: nn.Module, rebuildable: bool) -> Dict[str, Any]:
    """The model's part of a checkpoint payload: ``{"model": state}`` plus, when the body's frozen
    parameters are left out, ``{"frozen_body": {"names": [...], "sha256": ...}}``."""
    names = frozen_body_names(model, rebuildable)
    state = model.state_dict()
    if not names:
        return {"model": state}
    for name in names:
        del state[name]
    return {"model": state, FROZEN_KEY: {"names": names, "sha256": frozen_digest(model, names)}}


def load_model_state(model: nn.Module, saved: Dict[str, Any], source: str) -> None:
    """Load a checkpoint's ``model`` into ``model``, built from the run's config: a whole state dict
    as it is; a checkpoint without its frozen body once ``model``'s own frozen body is the one the
    run trained on (the same parameters, the same digest).

    Raises:
        CheckpointMismatch: the model's frozen body differs from the one the checkpoint was trained
            on (e.g. the weights file was replaced), or the tensors do not fit.
    """
    ref = saved.get(FROZEN_KEY)
    if ref is None:
        model.load_state_dict(saved["model"])
        return
    names = list(ref["names"])
    own = dict(model.named_parameters())
    absent = [n for n in names if n not in own]
    if absent:
        raise CheckpointMismatch(f"checkpoint {source} left out body tensors this model does not have, "
                                 f"e.g. {absent[0]}")
    if frozen_digest(model, names) != ref["sha256"]:
        raise CheckpointMismatch(
            f"checkpoint {source} was trained on a frozen body whose weights differ from the body this "
            f"config builds now (SHA-256 {ref['sha256'][:12]}...): was model.weights_file replaced or "
            f"model.hub_tag changed since training?")
    missing, unexpected = model.load_state_dict(saved["model"], strict=False)
    missing = sorted(set(missing) - set(names))
    if missing or unexpected:
        what = f"{len(missing)} model tensors absent from it, e.g. {missing[0]}" if missing else \
            f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise CheckpointMismatch(f"checkpoint {source} comes from a different model: {what}")
