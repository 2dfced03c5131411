"""Image classification tasks: offline photo patches and digits, CIFAR-10/100, and shared helpers.

Why these tasks: the rank-gap hypothesis needs targets at graded distances from the source body.
Pretrained on fractals (``datasets.fractal``), a body sees held-out fractal classes as a small gap,
natural images as a medium gap and Darcy fields as a large gap. ``natural_patches`` and ``digits``
are built from files that ship inside scikit-image and scikit-learn, so the medium gap exists on a
machine with no internet; CIFAR-10/100 are there for users who have the archives (or a network).

Conventions shared by every image task here (and the fractal tasks):
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
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.errors import DataFileError
from datasets.registry import TaskData, get_task, register_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
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


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
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


def _check_common(obj: Any, positive_ints: Sequence[str], fractions: Sequence[str] = ()) -> None:
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


def _options_info(opts: Any) -> Dict[str, Any]:
    return {f.name: getattr(opts, f.name) for f in fields(opts)}


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
class NaturalPatchesOptions:
    """Options of ``natural_patches``: label = which photograph a patch was cut from."""

    photos: Tuple[str, ...] = field(default=DEFAULT_PHOTOS, metadata={
        "help": f"skimage.data photographs, one class each; allowed: {', '.join(SKIMAGE_PHOTOS)}"})
    photo_short_side: int = field(default=512, metadata={"help": "each photo is resized to this short side first"})
    patch_size: int = field(default=32, metadata={"help": "patch side in pixels of the resized photo"})
    block_tiles: int = field(default=2, metadata={
        "help": "patches are split in blocks of block_tiles x block_tiles neighbours (less leakage between splits)"})
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of each photo's blocks for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "fraction of each photo's blocks for test"})
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed block-to-split assignment"})
    image_size: int = field(default=224, metadata={"help": "patches are resized to image_size x image_size"})
    interpolation: str = field(default="bilinear", metadata={"help": f"resize mode: {' | '.join(INTERPOLATIONS)}"})
    presize: bool = field(default=True, metadata={
        "help": "resize all patches once at build time (uint8, 3 * image_size^2 bytes each) instead of per item"})

    def __post_init__(self):
        if isinstance(self.photos, str):
            self.photos = (self.photos,)
        self.photos = tuple(self.photos)
        bad = [p for p in self.photos if p not in SKIMAGE_PHOTOS]
        if bad or len(self.photos) < 2 or len(set(self.photos)) != len(self.photos):
            raise ValueError(f"NaturalPatchesOptions.photos must be >= 2 distinct names from {SKIMAGE_PHOTOS}, "
                             f"got {self.photos!r}")
        _check_common(self, ("photo_short_side", "patch_size", "block_tiles", "image_size"),
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
    fractions = (1.0 - opts.val_fraction - opts.test_fraction, opts.val_fraction, opts.test_fraction)
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
    info = dict(_options_info(opts), source="skimage.data photographs", normalization="imagenet")
    return classification_task_data(splits, info)


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 handwritten digits, upsampled
# ----------------------------------------------------------------------------------------------
@dataclass
class DigitsOptions:
    """Options of ``digits`` (scikit-learn's 1797 8x8 digits, 10 classes)."""

    image_size: int = field(default=224, metadata={"help": "digits are upsampled to image_size x image_size"})
    val_fraction: float = field(default=0.15, metadata={"help": "stratified fraction for validation"})
    test_fraction: float = field(default=0.2, metadata={"help": "stratified fraction for test"})
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed stratified split"})
    interpolation: str = field(default="bilinear", metadata={"help": f"upsampling: {' | '.join(INTERPOLATIONS)}"})
    presize: bool = field(default=True, metadata={
        "help": "upsample all digits once at build time (uint8, 3 * image_size^2 bytes each) instead of per item"})

    def __post_init__(self):
        _check_common(self, ("image_size",), ("val_fraction", "test_fraction"))


def digits_split_indices(opts: DigitsOptions) -> Dict[str, np.ndarray]:
    """The fixed stratified train/val/test indices into ``sklearn.datasets.load_digits()``."""
    from sklearn.datasets import load_digits

    y = load_digits().target
    fr = (1.0 - opts.val_fraction - opts.test_fraction, opts.val_fraction, opts.test_fraction)
    return dict(zip(("train", "val", "test"), _stratified_split(y, fr, opts.split_seed)))


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
    info = dict(_options_info(opts), source="sklearn.datasets.load_digits", normalization="imagenet")
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
        _check_common(self, ("image_size", "val_size"))
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
    tr, val = _stratified_split(y_train.numpy(), (1.0 - frac, frac), opts.split_seed)
    splits = ClassificationSplits(
        train=ImageTensorDataset(x_train, y_train, tr, opts.image_size, opts.interpolation, augment=opts.augment),
        val=ImageTensorDataset(x_train, y_train, val, opts.image_size, opts.interpolation),
        test=ImageTensorDataset(x_test, y_test, np.arange(len(y_test)), opts.image_size, opts.interpolation),
        num_classes=_CIFAR[name]["classes"])
    info = dict(_options_info(opts), source=f"torchvision {_CIFAR[name]['cls']} at {Path(data_root).resolve()}",
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
