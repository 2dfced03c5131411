"""What every stage needs at run time: seeding, the device, autocast, and the target samples.

Why one low module: stage 0 (``orca.pretrain``), stage 1 (``orca.align.loop``), stage 2
(``rank_estimation.stage``) and stage 3 (``orca.train``) each seed, pick a device and an autocast
context the same way, and stages 1 and 2 draw the same labelled target samples (inputs with their
augmentations replayed from a seed, real classes or k-means clusters of regression targets). Kept
here, each stage imports these pieces and no stage imports another.
"""
from __future__ import annotations

import contextlib
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from datasets.registry import TaskData
from orca.align.config import AlignConfig


# ----------------------------------------------------------------------------- seeding, device, precision
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; refuse an explicit CUDA device that is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is visible; use train.device=cpu or auto")
    return device


#: The values of ``train.amp`` (and of stage 2's feature capture's ``amp``) that :func:`autocast_for` reads.
AMP_MODES = ("auto", "bf16", "off")


def autocast_for(amp: str, device: torch.device):
    """The autocast context of ``train.amp``: bf16 on CUDA by default, full precision on CPU."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- target samples (stages 1 and 2)
def target_indices(n_train: int, n_target: Optional[int]) -> List[int]:
    """The first ``n_target`` of ``n_train`` training items (all when None; ORCA uses all)."""
    if n_target is not None and n_target > n_train:
        raise ValueError(f"align.n_target={n_target} exceeds the {n_train} training samples of the target task; "
                         f"lower it or set it to null (all)")
    return list(range(n_train if n_target is None else n_target))


def fetch_inputs(dataset, indices: Sequence[int], seed: int) -> torch.Tensor:
    """Stack the inputs ``x`` of ``dataset[indices]`` with the torch RNG seeded to ``seed``.

    Why seeded: random augmentations must produce the same inputs in the no-grad pass and the
    backward pass of one stage-1 step (``orca.align.loop``), without disturbing the global RNG.

    Returns:
        ``[len(indices), C, H, W]`` float32.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([dataset[int(i)][0] for i in indices]).float()


def kmeans_labels(targets: torch.Tensor, k: int, n_init: int, seed: int) -> torch.Tensor:
    """ORCA's pseudo-labels for regression targets: k-means on the flattened target fields.

    Args:
        targets: ``[n, ...]`` target values (e.g. Darcy solutions ``[n, s, s]``).
        k: clusters; must be <= n.
        n_init: k-means restarts (fixed, so the labelling is a function of the seed).
        seed: k-means ``random_state``.
    Returns:
        ``[n]`` int64 cluster ids in ``[0, k)``.
    """
    from sklearn.cluster import KMeans

    flat = targets.reshape(targets.shape[0], -1).double().numpy()
    if k > flat.shape[0]:
        raise ValueError(f"align.n_clusters={k} is larger than the {flat.shape[0]} target samples; "
                         f"k-means needs at least k samples: lower align.n_clusters or raise align.n_target")
    if not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat).all(1))[0])
        raise ValueError(f"target labels (regression targets) hold NaN/inf, first in training sample {bad}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    return torch.from_numpy(km.fit_predict(flat).astype(np.int64))


def target_labels(task: TaskData, indices: Sequence[int], align_cfg: AlignConfig, seed: int) -> Tuple[torch.Tensor, str]:
    """Labels of the target samples: real classes, or k-means clusters for dense/regression tasks.

    Returns:
        ``(labels [n] int64, how)`` where ``how`` says which rule was used (for ``alignment.json``).
    """
    ds = task.train
    if task.kind == "classification":
        if hasattr(ds, "targets"):  # avoids decoding every image just for its label
            all_labels = torch.as_tensor(ds.targets, dtype=torch.int64)
            return all_labels[torch.as_tensor(list(indices), dtype=torch.int64)], "classes"
        return torch.tensor([int(ds[int(i)][1]) for i in indices], dtype=torch.int64), "classes"
    ys = torch.stack([torch.as_tensor(ds[int(i)][1]) for i in indices])
    return kmeans_labels(ys, align_cfg.n_clusters, align_cfg.kmeans_n_init, seed), f"kmeans(k={align_cfg.n_clusters})"
