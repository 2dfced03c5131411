"""Image classification tasks: offline photo patches and digits, CIFAR-10/100, and stage 1's source set.

Why these tasks: the rank-gap hypothesis needs targets at graded distances from the source body.
Pretrained on fractals (``datasets.fractal``), a body sees held-out fractal classes as a small gap,
natural images as a medium gap and Darcy fields as a large gap. ``natural_patches`` and ``digits``
are built from files that ship inside scikit-image and scikit-learn, so the medium gap exists on a
machine with no internet; CIFAR-10/100 are there for users who have the archives (or a network).
The conventions every classification task follows, and the helpers they share, are in
:mod:`datasets.classification` (re-exported here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from datasets.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    ClassificationSplits,
    ImageTensorDataset,
    SplitOptions,
    check_split_options,
    classification_error,
    classification_task_data,
    cross_entropy_loss,
    normalize_uint8,
    options_info,
    random_resized_crop_flip,
    resize_images,
    stratified_split,
)
from datasets.errors import DataFileError
from datasets.registry import TaskData, get_task, register_task

__all__ = [
    "SKIMAGE_PHOTOS", "NaturalPatchesOptions", "PatchTable", "natural_patch_table", "build_natural_patches",
    "DigitsOptions", "digits_split_indices", "build_digits", "CifarOptions", "cifar_missing", "build_cifar10",
    "build_cifar100", "source_feature_set",
    # defined in datasets.classification, imported from here by existing code
    "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "ClassificationSplits", "ImageTensorDataset",
    "classification_error", "classification_task_data", "cross_entropy_loss", "normalize_uint8",
    "random_resized_crop_flip", "resize_images",
]


# ----------------------------------------------------------------------------------------------
# natural_patches: scikit-image's bundled photographs cut into labelled patches
# ----------------------------------------------------------------------------------------------
def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


# Photographs whose files ship inside the scikit-image wheel (checked offline with 0.26.0); the
# others in skimage.data download through pooch and would break the "no internet" promise.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "motorcycle",
                  "rocket", "moon", "hubble_deep_field", "immunohistochemistry", "retina")
DEFAULT_PHOTOS = SKIMAGE_PHOTOS[:10]


@dataclass
class NaturalPatchesOptions(SplitOptions):
    """Options of ``natural_patches``: label = which photograph a patch was cut from; a class's blocks
    of patches (not single patches) are what the split fractions divide."""

    photos: Tuple[str, ...] = field(default=DEFAULT_PHOTOS, metadata={
        "help": f"skimage.data photographs, one class each; allowed: {', '.join(SKIMAGE_PHOTOS)}"})
    photo_short_side: int = field(default=512, metadata={"help": "each photo is resized to this short side first"})
    patch_size: int = field(default=32, metadata={"help": "patch side in pixels of the resized photo"})
    block_tiles: int = field(default=2, metadata={
        "help": "patches are split in blocks of block_tiles x block_tiles neighbours (less leakage between splits)"})

    def __post_init__(self):
        if isinstance(self.photos, str):
            self.photos = (self.photos,)
        self.photos = tuple(self.photos)
        bad = [p for p in self.photos if p not in SKIMAGE_PHOTOS]
        if bad or len(self.photos) < 2 or len(set(self.photos)) != len(self.photos):
            raise ValueError(f"NaturalPatchesOptions.photos must be >= 2 distinct names from {SKIMAGE_PHOTOS}, "
                             f"got {self.photos!r}")
        check_split_options(self, ("photo_short_side", "patch_size", "block_tiles", "image_size"),
                      ("val_fraction", "test_fraction"))
        if self.patch_size * self.block_tiles * 3 > self.photo_short_side:
            raise ValueError(f"NaturalPatchesOptions: patch_size * block_tiles * 3 must be <= photo_short_side "
                             f"(3 split blocks per photo), got {self.patch_size} * {self.block_tiles} * 3 > "
                             f"{self.photo_short_side}")


@dataclass
class PatchTable:
    """All patches of ``natural_patches`` with where they came from.

    Attributes:
        patches: ``[N, 3, p, p]`` uint8.
        labels: ``[N]`` int64 photo index.
        boxes: ``[N, 4]`` int64 (top, left, bottom, right) pixel box in the resized photo.
        splits: ``{"train", "val", "test"} -> sorted indices into the table``.
    """

    patches: torch.Tensor
    labels: torch.Tensor
    boxes: np.ndarray
    splits: Dict[str, np.ndarray]


def natural_patch_table(opts: NaturalPatchesOptions) -> PatchTable:
    """Cut the photographs into a non-overlapping grid of patches and assign blocks to splits.

    Why blocks of neighbouring tiles: tiles never share pixels, but adjacent tiles are nearly the
    same texture; assigning whole blocks keeps most test patches away from training patches.

    Args:
        opts: task options.
    Returns:
        A :class:`PatchTable`; its splits are a fixed function of ``opts``.
    """
    p, bt = opts.patch_size, opts.block_tiles
    patches, labels, boxes = [], [], []
    split_of: List[int] = []
    fractions = opts.split_fractions()
    for label, name in enumerate(opts.photos):
        img = torch.from_numpy(np.ascontiguousarray(_skimage_photo(name))).float()
        img = img[..., None].expand(-1, -1, 3) if img.ndim == 2 else img[..., :3]
        img = img.permute(2, 0, 1)[None]
        h, w = img.shape[-2:]
        scale = opts.photo_short_side / min(h, w)
        size = (max(opts.photo_short_side, round(h * scale)), max(opts.photo_short_side, round(w * scale)))
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        img = img[0].round().clamp(0, 255).to(torch.uint8)
        # A grid of whole blocks, centred; the margin that doesn't fill a block is dropped.
        nby, nbx = size[0] // (p * bt), size[1] // (p * bt)
        top0, left0 = (size[0] - nby * p * bt) // 2, (size[1] - nbx * p * bt) // 2
        rng = np.random.default_rng([opts.split_seed, label])
        order = rng.permutation(nby * nbx)
        n_val = max(1, int(round(fractions[1] * len(order))))
        n_test = max(1, int(round(fractions[2] * len(order))))
        block_split = np.zeros(len(order), dtype=np.int64)
        block_split[order[len(order) - n_val - n_test:len(order) - n_test]] = 1
        block_split[order[len(order) - n_test:]] = 2
        for by in range(nby):
            for bx in range(nbx):
                for ty in range(bt):
                    for tx in range(bt):
                        top = top0 + (by * bt + ty) * p
                        left = left0 + (bx * bt + tx) * p
                        patches.append(img[:, top:top + p, left:left + p])
                        labels.append(label)
                        boxes.append((top, left, top + p, left + p))
                        split_of.append(int(block_split[by * nbx + bx]))
    split_arr = np.asarray(split_of)
    return PatchTable(
        patches=torch.stack(patches), labels=torch.tensor(labels, dtype=torch.int64), boxes=np.asarray(boxes),
        splits={name: np.flatnonzero(split_arr == k) for k, name in enumerate(("train", "val", "test"))})


@register_task("natural_patches", NaturalPatchesOptions)
def build_natural_patches(opts: NaturalPatchesOptions, data_root: str) -> TaskData:
    """Medium-gap target: which scikit-image photograph a patch comes from (offline, no files needed)."""
    table = natural_patch_table(opts)
    def make(split: str) -> ImageTensorDataset:
        return ImageTensorDataset(table.patches, table.labels, table.splits[split], opts.image_size, opts.interpolation,
                                  presize=opts.presize)

    splits = ClassificationSplits(make("train"), make("val"), make("test"), num_classes=len(opts.photos))
    info = dict(options_info(opts), source="skimage.data photographs", normalization="imagenet")
    return classification_task_data(splits, info)


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 handwritten digits, upsampled
# ----------------------------------------------------------------------------------------------
@dataclass
class DigitsOptions(SplitOptions):
    """Options of ``digits`` (scikit-learn's 1797 8x8 digits, 10 classes)."""

    test_fraction: float = field(default=0.2, metadata={"help": "fraction of each class for test"})

    def __post_init__(self):
        check_split_options(self, ("image_size",), ("val_fraction", "test_fraction"))


def digits_split_indices(opts: DigitsOptions) -> Dict[str, np.ndarray]:
    """The fixed stratified train/val/test indices into ``sklearn.datasets.load_digits()``."""
    from sklearn.datasets import load_digits

    y = load_digits().target
    return dict(zip(("train", "val", "test"), stratified_split(y, opts.split_fractions(), opts.split_seed)))


@register_task("digits", DigitsOptions)
def build_digits(opts: DigitsOptions, data_root: str) -> TaskData:
    """Medium-gap target: scikit-learn's 8x8 digits upsampled (offline, no files needed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every task shares the uint8 -> ImageNet path.
    imgs = torch.from_numpy(np.round(d.images * (255.0 / 16.0))).to(torch.uint8)[:, None].expand(-1, 3, -1, -1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = digits_split_indices(opts)
    def make(split: str) -> ImageTensorDataset:
        return ImageTensorDataset(imgs, labels, idx[split], opts.image_size, opts.interpolation, presize=opts.presize)

    splits = ClassificationSplits(make("train"), make("val"), make("test"), num_classes=10)
    info = dict(options_info(opts), source="sklearn.datasets.load_digits", normalization="imagenet")
    return classification_task_data(splits, info)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 through torchvision
# ----------------------------------------------------------------------------------------------
_CIFAR = {
    "cifar10": dict(cls="CIFAR10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz", classes=10),
    "cifar100": dict(cls="CIFAR100", folder="cifar-100-python", archive="cifar-100-python.tar.gz", classes=100),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass
class CifarOptions:
    """Options of ``cifar10`` / ``cifar100``: test = the official test set, val = carved from train."""

    image_size: int = field(default=224, metadata={"help": "32x32 images are upsampled to image_size"})
    val_size: int = field(default=5000, metadata={"help": "stratified validation images taken from the 50k train"})
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed train/val split"})
    download: bool = field(default=False, metadata={"help": "download into data_root when missing (needs internet)"})
    augment: bool = field(default=False, metadata={"help": "random crop (pad 4) + horizontal flip on train"})
    interpolation: str = field(default="bilinear", metadata={"help": f"upsampling: {' | '.join(INTERPOLATIONS)}"})

    def __post_init__(self):
        check_split_options(self, ("image_size", "val_size"))
        if self.val_size >= 50000:
            raise ValueError(f"CifarOptions.val_size must be < 50000 (the train set), got {self.val_size}")


def cifar_missing(name: str, root: str, reason: str = "") -> DataFileError:
    """The one error a user without the CIFAR files sees: where to put which folder."""
    meta = _CIFAR[name]
    where = Path(root).resolve()
    return DataFileError(
        f"{name}: files not found or unreadable{f' ({reason})' if reason else ''}", str(where / meta["folder"]),
        f"put the extracted folder '{meta['folder']}/' (from {meta['archive']}, {CIFAR_URL}{meta['archive']}) "
        f"into the directory {where}, or set the task option download=true on a machine with internet")


def _load_cifar(name: str, root: str, download: bool):
    import torchvision

    cls = getattr(torchvision.datasets, _CIFAR[name]["cls"])
    try:
        return cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"; offline: URLError
        raise cifar_missing(name, root, f"{type(err).__name__}: {err}") from err


def _build_cifar(name: str, opts: CifarOptions, data_root: str) -> TaskData:
    train_set, test_set = _load_cifar(name, data_root, opts.download)
    x_train = torch.from_numpy(train_set.data).permute(0, 3, 1, 2).contiguous()
    y_train = torch.tensor(train_set.targets, dtype=torch.int64)
    x_test = torch.from_numpy(test_set.data).permute(0, 3, 1, 2).contiguous()
    y_test = torch.tensor(test_set.targets, dtype=torch.int64)
    frac = opts.val_size / len(y_train)
    tr, val = stratified_split(y_train.numpy(), (1.0 - frac, frac), opts.split_seed)
    splits = ClassificationSplits(
        train=ImageTensorDataset(x_train, y_train, tr, opts.image_size, opts.interpolation, augment=opts.augment),
        val=ImageTensorDataset(x_train, y_train, val, opts.image_size, opts.interpolation),
        test=ImageTensorDataset(x_test, y_test, np.arange(len(y_test)), opts.image_size, opts.interpolation),
        num_classes=_CIFAR[name]["classes"])
    info = dict(options_info(opts), source=f"torchvision {_CIFAR[name]['cls']} at {Path(data_root).resolve()}",
                normalization="imagenet")
    return classification_task_data(splits, info)


@register_task("cifar100", CifarOptions)
def build_cifar100(opts: CifarOptions, data_root: str) -> TaskData:
    """CIFAR-100 (small gap from an ImageNet body) from data_root/cifar-100-python/."""
    return _build_cifar("cifar100", opts, data_root)


@register_task("cifar10", CifarOptions)
def build_cifar10(opts: CifarOptions, data_root: str) -> TaskData:
    """CIFAR-10 from data_root/cifar-10-batches-py/ (ORCA's stage-1 source set)."""
    return _build_cifar("cifar10", opts, data_root)


# ----------------------------------------------------------------------------------------------
# stage 1's labelled source set
# ----------------------------------------------------------------------------------------------
def source_feature_set(name: str, n: int, image_size: int = 224, seed: int = 0, data_root: str = "data",
                       options: Optional[Dict[str, Any]] = None,
                       device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """A labelled image set from a registered classification task, for stage 1's OTDD source side.

    ORCA uses 5000 CIFAR-10 training images; offline, ``name="fractal"`` gives the same shape of set
    from the pretraining distribution (10 classes by default; same generator seed as pretraining
    unless ``options`` says otherwise), rendered in batches on ``device``.

    Args:
        name: registered classification task (``"cifar10"``, ``"fractal"``, ...).
        n: number of images (>= 1).
        image_size: height = width of the returned images.
        seed: picks which training items are drawn (not the task's data).
        data_root: passed to the task builder (where CIFAR files live).
        options: extra task options (e.g. ``{"num_classes": 10, "seed": 0}`` for fractal).
        device: render device for fractal tasks.
    Returns:
        ``(images [n, 3, image_size, image_size] float32 normalised, labels [n] int64)`` on the CPU.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"source_feature_set: n must be an integer >= 1, got {n!r}")
    entry = get_task(name)
    names = {f.name for f in fields(entry.options)}
    kw: Dict[str, Any] = {"image_size": image_size}
    kw.update(options or {})
    if "train_per_class" in names:  # a generated task: make just enough training items
        k = kw.setdefault("num_classes", 10)
        kw.setdefault("train_per_class", math.ceil(n / k))
        kw.setdefault("val_per_class", 1)
        kw.setdefault("test_per_class", 1)
    task = entry.build(entry.options(**kw), data_root)
    if task.kind != "classification":
        raise ValueError(f"source_feature_set needs a classification task, {name!r} is {task.kind!r}")
    train = task.train
    if n > len(train):
        raise ValueError(f"source_feature_set: asked for {n} images, {name!r} has {len(train)} training items")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    if hasattr(train, "get_batch"):  # generated tasks render the whole set in batches on `device`
        x, y = train.get_batch(idx.tolist(), device=device)
        return x.cpu(), y.cpu()
    items = [train[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)
