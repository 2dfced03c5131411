"""What every classification task shares: ImageNet normalisation, loss and metric, the uint8 image
data set, resizing and augmentation, fixed stratified splits and the options' checks.

Conventions (every image task, the fractal tasks and ``tones``):
- ``x`` is ``[3, H, W]`` float32: images in [0, 1] (grayscale repeated over 3 channels), then
  normalised with the ImageNet mean/std that timm's Swin checkpoints were trained with
  (``IMAGENET_MEAN``, ``IMAGENET_STD``), so a pretrained patch embedding sees its usual statistics.
- ``y`` is an int class index; the loss is mean cross entropy and the metric the per-sample 0-1
  error (``metric_name="error"``).
- Splits are fixed by a ``split_seed`` (never the run seed), so every run of a task scores on the
  same test images, and validation is always carved from training data, never from test.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.registry import TaskData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images to float32 normalised with ImageNet mean/std.

    Args:
        images: ``[..., 3, H, W]`` uint8 (or float already in [0, 255]).
    Returns:
        ``[..., 3, H, W]`` float32.
    """
    mean, std = _imagenet_stats(images.device)
    return (images.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean/std ``[3, 1, 1]`` on ``device``, made once: a fresh host-to-GPU copy per batch would
    synchronise the training loop with the GPU at every step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1))


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (the training loss of every classification task).

    Args:
        logits: ``[B, K]``.
        y: ``[B]`` int64 class indices.
    """
    return F.cross_entropy(logits, y)


def classification_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample 0-1 error; its mean over the test set is the error rate the tables report.

    Args:
        logits: ``[B, K]``.
        y: ``[B]`` int64 class indices.
    Returns:
        ``[B]`` float32, 1 where the arg-max class is wrong.
    """
    return (logits.argmax(dim=-1) != y).float()


@dataclass
class ClassificationSplits:
    """Three datasets of one classification task and its number of classes."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


def classification_task_data(splits: ClassificationSplits, info: Dict[str, Any]) -> TaskData:
    """Wrap classification splits into a :class:`TaskData` with the shared loss and metric."""
    info = dict(info, sizes={"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
                num_classes=splits.num_classes)
    return TaskData(train=splits.train, val=splits.val, test=splits.test, in_channels=3, kind="classification",
                    out_shape=(splits.num_classes,), loss=cross_entropy_loss, metric=classification_error,
                    metric_name="error", info=info)


def resize_images(images: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize float images to ``size x size`` (antialiased when shrinking, so patches don't alias).

    Args:
        images: ``[B, C, H, W]`` float.
        size: output height = width.
        interpolation: one of ``INTERPOLATIONS``.
    Returns:
        ``[B, C, size, size]`` float.
    """
    if images.shape[-2:] == (size, size):
        return images
    if interpolation == "nearest":
        return F.interpolate(images, size=(size, size), mode="nearest-exact")
    shrink = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode=interpolation, align_corners=False, antialias=shrink)


def random_resized_crop_flip(images: torch.Tensor, min_area: float = 0.35,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A batched square random-resized crop plus horizontal flip, one resample per image on its device.

    Why one ``grid_sample`` instead of per-image crops: pretraining augments thousands of images per
    second on the GPU, where a Python loop over images would be the bottleneck. The random draws are
    made on the CPU (``generator``), so a seeded run augments identically on any device.

    Args:
        images: ``[B, C, H, W]`` float (any range; bilinear resampling keeps it).
        min_area: smallest crop area as a fraction of the image, in (0, 1]; crops are square in
            relative coordinates, so the aspect ratio is kept.
        generator: CPU generator of the crop sizes, offsets and flips (default: torch's global one).
    Returns:
        ``[B, C, H, W]`` float on ``images.device``.
    """
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"min_area must be in (0, 1], got {min_area!r}")
    b = images.shape[0]
    r = torch.rand(b, 4, generator=generator, dtype=torch.float32)
    side = torch.sqrt(min_area + (1.0 - min_area) * r[:, 0])  # crop side as a fraction of the image side
    tx, ty = (2 * r[:, 1] - 1) * (1 - side), (2 * r[:, 2] - 1) * (1 - side)  # keeps the crop inside
    flip = torch.where(r[:, 3] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    if images.is_cuda:  # pinned + non_blocking: the copy does not wait for the GPU to drain
        theta = theta.pin_memory().to(images.device, non_blocking=True)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class ImageTensorDataset(Dataset):
    """Items of a uint8 image tensor, resized to ``image_size`` and normalised on access.

    Why store at source resolution: 32x32 CIFAR or 48x48 photo patches cost 50x less memory than the
    224x224 floats the model eats; resizing one image is cheap next to a Swin forward pass.

    Args:
        images: ``[N, 3, h, w]`` uint8, shared (not copied) between splits.
        labels: ``[N]`` int64.
        indices: the items of this split (positions in ``images``).
        image_size: output height = width.
        interpolation: resize mode (``INTERPOLATIONS``).
        augment: random crop (pad h/8, reflect) + horizontal flip at source resolution; train only.
        presize: resize every item once at construction and keep the uint8 result (``3 * image_size^2``
            bytes per item); for splits without augmentation. Items are rounded to uint8 levels on
            either path, so presized and on-access items are bit-identical.
    Items:
        ``([3, image_size, image_size] float32, label int)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int], image_size: int,
                 interpolation: str = "bilinear", augment: bool = False, presize: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, h, w], got {images.dtype} {tuple(images.shape)}")
        if presize and augment:
            raise ValueError("ImageTensorDataset: presize=True needs augment=False (augmentation happens "
                             "at source resolution, before the resize)")
        self.images, self.labels = images, labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.interpolation, self.augment = image_size, interpolation, augment
        self._presized: Optional[torch.Tensor] = None
        if presize:  # chunks keep the float intermediate small
            chunks = [self._resize_uint8(images[torch.from_numpy(self.indices[i:i + 256])].float())
                      for i in range(0, len(self.indices), 256)]
            self._presized = torch.cat(chunks) if chunks else images.new_empty((0, 3, image_size, image_size))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> List[int]:
        """Labels of this split, in item order."""
        return self.labels[torch.from_numpy(self.indices)].tolist()

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        pad = max(1, h // 8)  # CIFAR's standard 4 px at 32 px
        padded = F.pad(img[None], (pad, pad, pad, pad), mode="reflect")[0]
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        img = padded[:, top:top + h, left:left + w]
        return img.flip(-1) if bool(torch.rand(()) < 0.5) else img

    def _resize_uint8(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` float 0..255 -> ``[B, 3, S, S]`` uint8 (what a stored S px image would hold)."""
        return resize_images(imgs, self.image_size, self.interpolation).clamp_(0, 255).round_().to(torch.uint8)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        j = int(self.indices[index])
        if self._presized is not None:
            return normalize_uint8(self._presized[index].float()), int(self.labels[j])
        img = self.images[j].float()
        if self.augment:
            img = self._augment(img)
        return normalize_uint8(self._resize_uint8(img[None])[0].float()), int(self.labels[j])


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Split item positions into len(fractions) disjoint, class-stratified, sorted index arrays.

    Why our own instead of sklearn's train_test_split: it returns the same indices for the same
    (labels, fractions, seed) on any library version, and every class appears in every split.
    """
    rng = np.random.default_rng(seed)
    parts: List[List[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = [int(round(f * len(idx))) for f in fractions[1:]]
        bounds = np.cumsum([len(idx) - sum(counts)] + counts)
        for p, (lo, hi) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
            parts[p].extend(idx[lo:hi].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@dataclass
class SplitOptions:
    """The options every fixed-split image classification task shares: the size its items are resized
    to, and the fixed class-stratified division of its labelled items into train / validation / test.

    Task options subclass it and call :func:`check_split_options` in ``__post_init__``.
    """

    image_size: int = field(default=224, metadata={"help": "items are resized to image_size x image_size"})
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of each class for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "fraction of each class for test"})
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed split (never the run seed)"})
    interpolation: str = field(default="bilinear", metadata={"help": f"resize mode: {' | '.join(INTERPOLATIONS)}"})
    presize: bool = field(default=True, metadata={
        "help": "resize every item once at build time (uint8, 3 * image_size^2 bytes each) instead of per item"})

    def split_fractions(self) -> Tuple[float, float, float]:
        """(train, val, test) fractions: training data is what validation and test leave."""
        return (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)


def check_split_options(obj: Any, positive_ints: Sequence[str], fractions: Sequence[str] = ()) -> None:
    """Shared __post_init__ checks; errors name the class, field, value and allowed range."""
    cls = type(obj).__name__
    for name in positive_ints:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cls}.{name} must be an integer >= 1, got {value!r}")
    for name in fractions:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{cls}.{name} must be in (0, 1), got {value!r}")
    if len(fractions) and sum(getattr(obj, n) for n in fractions) >= 1.0:
        raise ValueError(f"{cls}: {' + '.join(fractions)} must be < 1 (the rest is training data)")
    seed = getattr(obj, "split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{cls}.split_seed must be an integer >= 0, got {seed!r}")
    interp = getattr(obj, "interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        raise ValueError(f"{cls}.interpolation must be one of {INTERPOLATIONS}, got {interp!r}")


def options_info(opts: Any) -> Dict[str, Any]:
    """A task's options as the plain dict its ``TaskData.info`` (and so every run summary) records."""
    return {f.name: getattr(opts, f.name) for f in fields(opts)}
