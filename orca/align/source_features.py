"""Stage 1's source side: labelled source images through the body's frozen patch embedding, cached.

    python -m orca stage1 --config configs/darcy_tiny.yaml                  # fills the cache on first use
    python -m orca stage1 --config configs/darcy_tiny.yaml align.source=fractal align.n_source=500

ORCA aligns the target embedder to 5,000 CIFAR-10 images pushed through the pretrained patch
embedding and averaged over tokens (one 128-d vector per image for Swin-B). Those features do not
depend on anything stage 1 trains, so every run with the same body, weights, source set, size,
resolution and seed would recompute identical numbers: they are cached under
``{task.data_root}/{align.cache_dir}/``. The cache key names everything the features depend on --
including the SHA-256 of a local weights file, because two checkpoints at one path are different
bodies -- and the file stores its own key, so a stale or colliding file is recomputed, never used.
Writes go to a temporary file that is renamed into place, so concurrent runs and killed runs never
leave a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from datasets.images import source_feature_set
from orca.model import source_embedder
from orca.runs import atomic_write_bytes

#: Bump when the definition of a source feature changes, so old caches stop matching.
FEATURE_VERSION = 1


@dataclass
class SourceFeatures:
    """Labelled source features and where they came from.

    Attributes:
        feats: ``[N, D]`` float32 token-averaged patch-embedding outputs (CPU).
        labels: ``[N]`` int64 class labels of the source images (CPU).
        key: everything the features depend on (what the cache is keyed by).
        path: the cache file.
        from_cache: True when read from ``path`` rather than computed in this call.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    key: Dict[str, Any]
    path: Path
    from_cache: bool

    def describe(self) -> Dict[str, Any]:
        """Plain-data record of the source set for ``alignment.json`` and the run summary."""
        counts = torch.bincount(self.labels).tolist() if self.labels.numel() else []
        return {"dataset": self.key["source"], "options": self.key["source_options"], "n": int(self.feats.shape[0]),
                "dim": int(self.feats.shape[1]), "classes": int(sum(c > 0 for c in counts)),
                "per_class": [c for c in counts if c > 0], "seed": self.key["seed"],
                "image_size": self.key["img_size"], "body": self.key["body"], "weights": self.key["weights"],
                "cache": str(self.path), "from_cache": self.from_cache}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (a Swin-B checkpoint is ~350 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(model_cfg) -> Dict[str, Any]:
    """What identifies the body's weights: hub tag, resolved file path plus content hash, or none.

    With ``weights=none`` the patch embedding is a random init drawn from the run seed, which is
    part of the cache key anyway.
    """
    if model_cfg.weights == "hub":
        return {"kind": "hub", "tag": f"{model_cfg.body}.{model_cfg.hub_tag}"}
    if model_cfg.weights == "file":
        path = Path(model_cfg.weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights_file={model_cfg.weights_file!r} does not exist "
                                    f"(needed to identify the source features of stage 1)")
        return {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    return {"kind": "none"}


def source_cache_key(model_cfg, align_cfg, seed: int) -> Dict[str, Any]:
    """Everything the source features depend on, as plain JSON-able data.

    Args:
        model_cfg: the ModelConfig (body name, body_kwargs, weights, img_size).
        align_cfg: the AlignConfig (source, source_options, n_source).
        seed: run seed; picks which source images are drawn (and the random body for weights=none).
    """
    return {"version": FEATURE_VERSION, "body": model_cfg.body,
            "body_kwargs": json.loads(json.dumps(model_cfg.body_kwargs, sort_keys=True, default=list)),
            "weights": weights_identity(model_cfg), "img_size": int(model_cfg.img_size),
            "source": align_cfg.source,
            "source_options": json.loads(json.dumps(align_cfg.source_options, sort_keys=True, default=list)),
            "n": int(align_cfg.n_source), "seed": int(seed)}


def cache_file(data_root: str, align_cfg, key: Dict[str, Any]) -> Path:
    """``{data_root}/{align.cache_dir}/source__{source}__n{n}__{hash16}.safetensors`` for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_root) / align_cfg.cache_dir / f"source__{key['source']}__n{key['n']}__{digest}.safetensors"


def token_mean(tokens: torch.Tensor) -> torch.Tensor:
    """Average an embedder's token grid ``[B, h, w, D]`` (or ``[B, L, D]``) to ``[B, D]``, as ORCA does."""
    return tokens.flatten(1, -2).mean(1)


@torch.no_grad()
def embed_mean(embedder: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Token-averaged embedder outputs of ``images`` in batches, without autograd.

    Args:
        embedder: maps ``[B, C, H, W]`` to tokens ``[B, h, w, D]``.
        images: ``[N, C, H, W]`` on any device.
        batch_size: images per forward pass.
        device: where the embedder runs.
    Returns:
        ``[N, D]`` float32 on the CPU.
    """
    out = [token_mean(embedder(images[i:i + batch_size].to(device))).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def compute_source_features(model_cfg, align_cfg, seed: int, data_root: str,
                            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw the labelled source images and embed them with the body's frozen pretrained patch embedding.

    Args:
        model_cfg: the ModelConfig (which body and weights define the source distribution).
        align_cfg: the AlignConfig (source task, its options, n_source, batch_size).
        seed: which source images are drawn.
        data_root: where the source task's files live (CIFAR archives).
        device: where the embedding (and a fractal source's rendering) runs.
    Returns:
        ``(feats [N, D] float32, labels [N] int64)`` on the CPU.
    """
    images, labels = source_feature_set(align_cfg.source, align_cfg.n_source, image_size=model_cfg.img_size,
                                        seed=seed, data_root=data_root, options=dict(align_cfg.source_options),
                                        device=device)
    embedder = source_embedder(model_cfg).to(device).eval().requires_grad_(False)
    return embed_mean(embedder, images, align_cfg.batch_size, device), labels.long().cpu()


def _read_cache(path: Path, key: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The cached (feats, labels) if ``path`` holds features for exactly ``key``; else None."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("key", "null"))
            if stored != key:
                return None
            feats, labels = handle.get_tensor("feats"), handle.get_tensor("labels")
    except Exception as err:  # a truncated or foreign file: recompute rather than fail the run
        warnings.warn(f"ignoring unreadable source-feature cache {path} ({type(err).__name__}: {err})",
                      RuntimeWarning, stacklevel=3)
        return None
    if feats.ndim != 2 or labels.shape != (feats.shape[0],) or feats.shape[0] != key["n"]:
        return None
    return feats, labels


def load_or_compute_source_features(model_cfg, align_cfg, seed: int, data_root: str,
                                    device: torch.device) -> SourceFeatures:
    """Source features from the cache when an entry for exactly this key exists, else compute and cache.

    Args:
        model_cfg, align_cfg, seed, data_root, device: as in :func:`compute_source_features`.
    Returns:
        :class:`SourceFeatures` (``from_cache`` tells which path was taken).
    """
    key = source_cache_key(model_cfg, align_cfg, seed)
    path = cache_file(data_root, align_cfg, key)
    if path.is_file():
        hit = _read_cache(path, key)
        if hit is not None:
            return SourceFeatures(hit[0], hit[1], key, path, from_cache=True)
    feats, labels = compute_source_features(model_cfg, align_cfg, seed, data_root, device)
    bad = int((~torch.isfinite(feats)).any(1).sum())
    if bad:  # refuse before caching: a cached NaN would fail every later run the same way
        raise ValueError(f"source features contain NaN/inf in {bad} of {feats.shape[0]} rows "
                         f"(align.source={align_cfg.source!r} through the {model_cfg.body} patch embedding, "
                         f"weights={model_cfg.weights}); check the source images and the body weights")
    tensors = {"feats": feats.contiguous(), "labels": labels.contiguous()}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)}))
    return SourceFeatures(feats, labels, key, path, from_cache=False)
