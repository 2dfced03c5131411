"""The gap dial: the body's own source images under a growing, information-preserving pixel scramble.

Why a dial: tasks collected from different modalities (PDE fields, audio, digits) differ in many
ways at once: input statistics, output type, difficulty, data size. A test of "the rank a task needs
grows with its modality gap" needs tasks that differ *only* in their distance from the pretrained
features. ``fractal_dial`` keeps the images, the labels and the splits fixed and turns one knob.

Level 0 is the source distribution itself: fresh instances (``instance_offset``, beyond every
instance stage 0 drew) of the very classes the body was pretrained on, rendered by
:mod:`datasets.fractal` with the pretraining render settings. Why seen classes rather than
held-out ones: with held-out classes level 0 would already carry a gap ("new classes"), and the
existing ``fractal_heldout`` task measures exactly that; here level 0 has no gap by construction,
so the gap of every level is the scramble's alone.

The transformation, level ``l`` of ``L = DIAL_LEVELS - 1``: the image is cut into ``patch_size``
squares (14 x 14 of 16 px at 224 px); a fixed seeded order of these squares scrambles the first
``round(l / L * n_squares)`` of them, each by its own fixed seeded permutation of its pixels (the
channels of a pixel move together). Why this bijection:

- it is a permutation of pixel positions, so it is exactly invertible (:meth:`PixelScramble.inverse`
  restores every value bit for bit) and preserves every pixel value: what can be learned is the same
  at every level (a model that applied the inverse first would see level 0);
- it keeps each square's colour histogram and position, so the coarse layout of the attractor
  survives and the task stays learnable at the top level, while the local edges and textures that
  the pretrained 4 px patch embedding and the first windows respond to are destroyed square by
  square: the distance to the pretrained features grows with the scrambled fraction;
- it is nested: the squares scrambled at level l are scrambled identically at every higher level
  (the order and the per-square permutations do not depend on the level), so a level is its
  predecessor plus more scrambled squares, never a different image;
- an orthogonal mixing of frequency bands would also be a bijection, but its inverse is exact only
  up to float rounding, and every band touches every pixel, so "how much" is not a count of pixels.

The scramble is applied after normalisation (per-channel constants, which commute with moving
pixels) and after any augmentation, to every split alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.fractal import HELDOUT_CLASS_OFFSET, FractalDataset, _FractalCommonOptions
from datasets.classification import ClassificationSplits, classification_task_data, options_info
from datasets.registry import TaskData, register_task

#: Number of dial levels: 0 (the source) .. DIAL_LEVELS - 1 (every square scrambled).
DIAL_LEVELS = 7
#: First instance id of the dial's images: stage 0 draws instances [0, 111) of each class.
DIAL_INSTANCE_OFFSET = 1000


@dataclass(frozen=True)
class PixelScramble:
    """A permutation of the pixel positions of ``[..., H, W]`` images, the same for every image.

    Attributes:
        perm: ``[H * W]`` int64; output pixel ``i`` (row-major) is input pixel ``perm[i]``.
        image_size: H = W.
    """

    perm: torch.Tensor
    image_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Scramble ``x [..., H, W]`` (any leading dims, any device, any dtype)."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"PixelScramble for {self.image_size} px images got shape {tuple(x.shape)}")
        flat = x.reshape(*x.shape[:-2], self.image_size * self.image_size)
        return flat[..., self.perm.to(x.device)].reshape(x.shape)

    def inverse(self) -> "PixelScramble":
        """The scramble that undoes this one exactly."""
        return PixelScramble(torch.argsort(self.perm), self.image_size)

    @property
    def moved(self) -> int:
        """Pixels whose position changes."""
        return int((self.perm != torch.arange(self.perm.numel())).sum())


def dial_scramble(level: int, image_size: int = 224, patch_size: int = 16, seed: int = 0,
                  levels: int = DIAL_LEVELS) -> PixelScramble:
    """The dial's scramble at ``level`` (module docstring); level 0 is the identity.

    Args:
        level: 0 .. levels - 1.
        image_size: H = W, a multiple of ``patch_size``.
        patch_size: side of a scrambled square.
        seed: seed of the square order and of every square's pixel permutation.
        levels: number of levels (the top one scrambles every square).
    """
    for name, value, low in (("levels", levels, 2), ("image_size", image_size, 1), ("patch_size", patch_size, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"dial_scramble: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < levels:
        raise ValueError(f"dial_scramble: level must be an integer in [0, {levels - 1}], got {level!r}")
    if image_size % patch_size:
        raise ValueError(f"dial_scramble: image_size={image_size} is not a multiple of patch_size={patch_size}")
    side = image_size // patch_size
    n_squares = side * side
    rng = np.random.default_rng([int(seed), image_size, patch_size])
    order = rng.permutation(n_squares)
    inner = np.stack([rng.permutation(patch_size * patch_size) for _ in range(n_squares)])  # [squares, p*p]
    k = int(round(level / (levels - 1) * n_squares))
    pos = np.arange(image_size * image_size).reshape(side, patch_size, side, patch_size)
    pos = pos.transpose(0, 2, 1, 3).reshape(n_squares, patch_size * patch_size)  # square -> its pixels
    perm = np.arange(image_size * image_size)
    for s in order[:k]:
        perm[pos[s]] = pos[s][inner[s]]
    return PixelScramble(torch.from_numpy(perm.astype(np.int64)), image_size)


class ScrambledDataset(Dataset):
    """A fractal dataset whose every input goes through one :class:`PixelScramble`; labels unchanged."""

    def __init__(self, base: FractalDataset, scramble: PixelScramble):
        self.base, self.scramble = base, scramble

    def __len__(self) -> int:
        return len(self.base)

    @property
    def targets(self):
        return self.base.targets

    def get_batch(self, indices: Sequence[int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.get_batch(indices, device)
        return self.scramble(x), y

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x, y = self.base[index]
        return self.scramble(x), y


@dataclass
class FractalDialOptions(_FractalCommonOptions):
    """Options of ``fractal_dial``. The render fields must equal the pretraining run's (the defaults do)
    for level 0 to be the source distribution."""

    level: int = field(default=0, metadata={
        "help": f"dial level 0..{DIAL_LEVELS - 1}: 0 = the source images, {DIAL_LEVELS - 1} = every square scrambled"})
    num_classes: int = field(default=100, metadata={"help": "pretraining classes [0, num_classes) to classify"})
    train_per_class: int = field(default=50, metadata={"help": "training instances per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation instances per class"})
    test_per_class: int = field(default=20, metadata={"help": "test instances per class"})
    instance_offset: int = field(default=DIAL_INSTANCE_OFFSET, metadata={
        "help": "first instance id (stage 0 trains on instances below 100 and validates below 111)"})
    patch_size: int = field(default=16, metadata={"help": "side in pixels of a scrambled square"})
    dial_seed: int = field(default=0, metadata={"help": "seed of the square order and the pixel permutations"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not 0 <= self.level < DIAL_LEVELS:
            raise ValueError(f"FractalDialOptions.level must be an integer in [0, {DIAL_LEVELS - 1}] "
                             f"(0 = the source images), got {self.level!r}")
        if self.num_classes > HELDOUT_CLASS_OFFSET:
            raise ValueError(f"FractalDialOptions.num_classes must be <= {HELDOUT_CLASS_OFFSET} (the pretraining "
                             f"classes), got {self.num_classes}")
        for name in ("instance_offset", "dial_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FractalDialOptions.{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 1 \
                or self.image_size % self.patch_size:
            raise ValueError(f"FractalDialOptions.patch_size must be a positive divisor of image_size="
                             f"{self.image_size}, got {self.patch_size!r}")

    def scramble(self) -> PixelScramble:
        return dial_scramble(self.level, self.image_size, self.patch_size, self.dial_seed)


def dial_splits(opts: FractalDialOptions) -> ClassificationSplits:
    """Level-0 splits (disjoint instance ranges from ``instance_offset`` on), each scrambled at ``opts.level``."""
    common = dict(num_classes=opts.num_classes, image_size=opts.image_size, seed=opts.seed, class_offset=0,
                  num_points=opts.num_points, mode=opts.mode, color=opts.color, splat_size=opts.splat_size,
                  splat_random=opts.splat_random, noise_std=opts.noise_std, fill_threshold=opts.fill_threshold,
                  cache=opts.cache, device=opts.device)
    first = opts.instance_offset
    n_tr, n_val = opts.train_per_class, opts.val_per_class
    scramble = opts.scramble()
    return ClassificationSplits(
        train=ScrambledDataset(FractalDataset(instances_per_class=n_tr, instance_offset=first,
                                              augment=opts.augment, **common), scramble),
        val=ScrambledDataset(FractalDataset(instances_per_class=n_val, instance_offset=first + n_tr, **common),
                             scramble),
        test=ScrambledDataset(FractalDataset(instances_per_class=opts.test_per_class,
                                             instance_offset=first + n_tr + n_val, **common), scramble),
        num_classes=opts.num_classes)


@register_task("fractal_dial", FractalDialOptions)
def build_fractal_dial(opts: FractalDialOptions, data_root: str) -> TaskData:
    """The gap dial: pretraining fractal classes, fresh instances, pixels scrambled in a growing share of squares."""
    info = options_info(opts)
    scramble = opts.scramble()
    info.update(source="FractalDB-style IFS (pretraining classes) under the dial's pixel scramble",
                classes=[0, opts.num_classes], levels=DIAL_LEVELS, pixels_moved=scramble.moved,
                normalization="imagenet")
    return classification_task_data(dial_splits(opts), info)
