"""ORCAModel = target embedder -> pretrained Swin body -> task head, and ``build_model(cfg, task)``.

The three parts stay separate attributes (``embedder``, ``body``, ``head``) because every stage
treats them differently: stage 1 trains only the embedder, stage 2 hooks the body's blocks, and
stage 3's adapter methods inject into ``body`` while keeping embedder and head fully trainable.
The body keeps timm's module names (``layers.{i}.blocks.{j}.attn.qkv``), so rank maps written by
stage 2 name the same modules that stage 3 adapts.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from orca.bodies import create_body, set_attention
from orca.embedders import ConvEmbedder2d
from orca.errors import READ_ERRORS, OrcaError, UsageError, reading
from orca.heads import ClassificationHead, DenseDecoderHead

EMBEDDER_FILE = "embedder.safetensors"  # what stage 1 writes into its run directory


class ORCAModel(nn.Module):
    """Embedder -> body (timm Swin without its patch embedding) -> head.

    Args:
        embedder: maps ``[B, C_in, H, W]`` to tokens ``[B, h, w, D]``.
        body: timm SwinTransformer whose ``patch_embed`` is the identity.
        head: maps final features ``[B, h', w', C]`` to the task output.
    """

    def __init__(self, embedder: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.embedder, self.body, self.head = embedder, body, head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final body features ``[B, h', w', C]`` of input ``[B, C_in, H, W]``."""
        return self.body.forward_features(self.embedder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def arch(self) -> Dict[str, Any]:
        """Shape facts a checkpoint must match before it is loaded into this model."""
        return {name: list(p.shape) for name, p in self.state_dict().items()}


def body_from_config(model_cfg) -> nn.Module:
    """The timm Swin body a ModelConfig names, with its weights (hub, file or none) and its own patch
    embedding still in place: the one place where a config becomes a body (stages 0-3 all use it)."""
    body = create_body(model_cfg.body, weights=model_cfg.weights, hub_tag=model_cfg.hub_tag,
                       weights_file=model_cfg.weights_file, img_size=model_cfg.img_size, **model_cfg.body_kwargs)
    set_attention(body, model_cfg.attention)
    return body


class BodyCache:
    """Bodies built earlier in this process, by config and by the state of the RNG that built them.

    Why: a pack of K runs builds K models exactly as each run alone would, and building the body
    (timm's random init, then the weights file over it) is most of that. Runs of one seed reach the
    body with the same RNG state, so building it again would give the same body and leave the RNG
    in the same state: the cache hands out a copy and moves the RNG to that state instead.

    With ``share_tensors`` the copies share the cached body's parameters and buffers (only the
    modules are copied): for runs that all freeze the body, as a pack's do, whose frozen tensors
    would be replaced by one shared body anyway, this saves a copy of the body per run.
    """

    FIELDS = ("body", "weights", "hub_tag", "weights_file", "body_kwargs", "img_size", "attention")

    def __init__(self, share_tensors: bool = False):
        self._built: Dict[Tuple[str, str], Tuple[nn.Module, torch.Tensor]] = {}
        self.share_tensors = share_tensors

    def __call__(self, model_cfg) -> nn.Module:
        spec = json.dumps({k: getattr(model_cfg, k) for k in self.FIELDS}, sort_keys=True, default=str)
        key = (spec, hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        hit = self._built.get(key)
        if hit is None:
            body = body_from_config(model_cfg)
            hit = self._built[key] = (body, torch.get_rng_state())
        torch.set_rng_state(hit[1])
        body = hit[0]
        # a copy: build_model and the adapter method change the body they get
        shared = {id(t): t for t in [*body.parameters(), *body.buffers()]} if self.share_tensors else None
        return copy.deepcopy(body, shared)


def build_model(model_cfg, task, bodies: Optional[BodyCache] = None) -> ORCAModel:
    """Build the model for ``task`` (a :class:`datasets.TaskData`) from ``model_cfg`` (a ModelConfig);
    ``bodies``: where to take the body from when it was built before (packed runs)."""
    body = bodies(model_cfg) if bodies is not None else body_from_config(model_cfg)
    patch = body.patch_embed
    embed_dim = patch.proj.out_channels
    embedder = ConvEmbedder2d(task.in_channels, embed_dim, img_size=model_cfg.img_size,
                              patch_size=patch.proj.kernel_size[0])
    if model_cfg.embedder_init == "pretrained":
        embedder.init_from_patch_embed(patch)
    body.patch_embed = nn.Identity()
    if model_cfg.embedder_from:
        load_embedder(embedder, model_cfg.embedder_from)
    width = body.num_features
    if task.kind == "classification":
        head = ClassificationHead(width, task.out_shape[0])
    else:
        scale = patch.proj.kernel_size[0] * 2 ** (len(body.layers) - 1)
        head = DenseDecoderHead(width, scale, task.out_shape, channels=model_cfg.decoder_channels)
    model = ORCAModel(embedder, body, head)
    model.weights_source = body.orca_weights
    return model


def task_shape(task) -> Dict[str, Any]:
    """What :func:`build_model` needs of a task. Stage 3 saves it in its checkpoints, so that
    ``orca export`` rebuilds the model without the task's data."""
    return {"in_channels": int(task.in_channels), "kind": task.kind, "out_shape": [int(s) for s in task.out_shape]}


def load_embedder(embedder: nn.Module, run_dir: str) -> None:
    """Load the aligned embedder that stage 1 saved in ``run_dir``."""
    path = Path(run_dir) / EMBEDDER_FILE
    if not path.is_file():
        raise UsageError(f"model.embedder_from: no {EMBEDDER_FILE} there", str(run_dir),
                         "point it at a finished stage-1 run directory")
    with reading(path, "the stage-1 embedder", "rerun stage 1, or point model.embedder_from at another run",
                 READ_ERRORS + (SafetensorError,)):
        state = load_file(str(path))
    own = embedder.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise OrcaError(f"the stage-1 embedder does not fit this model ({bad[0]}: "
                        f"{list(state[bad[0]].shape) if bad[0] in state else 'missing'} vs {list(own[bad[0]].shape)})",
                        str(path), "align with the same task, body and img_size, or drop model.embedder_from")
    embedder.load_state_dict(state)


def source_embedder(model_cfg) -> ConvEmbedder2d:
    """The body's own pretrained patch embedding as an RGB embedder (frozen by the caller).

    Stage 1 and stage 2 push *source* images through it: it defines the source feature distribution
    that the target embedder is aligned to and compared with.
    """
    body = body_from_config(model_cfg)
    patch = body.patch_embed
    embedder = ConvEmbedder2d(patch.proj.in_channels, patch.proj.out_channels, img_size=model_cfg.img_size,
                              patch_size=patch.proj.kernel_size[0])
    embedder.init_from_patch_embed(patch)
    return embedder
