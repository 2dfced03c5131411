"""FractalDB-style formula-driven source data: IFS classes rendered by the chaos game.

Why fractals: Kataoka et al. ("Pre-training without Natural Images", ACCV 2020) showed that
classifying iterated-function-system (IFS) attractors pretrains vision transformers with no natural
image at all. That gives orca-rank three things that need no download: a source body (pretrain on
``fractal``), a labelled source set for stage 1's OTDD when CIFAR-10 is absent, and a small-gap
target task (``fractal_heldout``: classes of the same generator that pretraining never saw).

The recipe (FractalDB, Sec. 3), with the choices this package makes (the systems in
:mod:`datasets.fractal_ifs`, the renderer in :mod:`datasets.fractal_render`, classes, instances,
the data set and the tasks here):

1. A class is an IFS of M in [2, 8] affine maps ``w_i(x, y) = (a x + b y + e, c x + d y + f)`` with
   (a..f) ~ U(-1, 1), picked with probability ``p_i ~ |det A_i|``. We keep only contractive maps
   (largest singular value < ``MAX_SIGMA``) so the attractor is bounded and a chain started at a
   map's fixed point never leaves it; FractalDB's filling-ratio filter then rejects systems whose
   coarse render covers less than ``fill_threshold`` of the image (thin lines, single dots).
2. An instance is its class perturbed: Gaussian noise on every parameter plus FractalDB's
   "weighting" of one parameter by w in {0.8, 0.9, 1.0, 1.1, 1.2}.
3. Rendering runs many chaos-game chains in parallel (vectorised over instances and chains), fits
   the points' bounding box to the image (each axis independently, as FractalDB does) and counts
   points per pixel with ``bincount``; optional k x k splatting (FractalDB's patch rendering), binary
   or log-density intensity, grayscale or one colour per instance.

Determinism: every random number of an image comes from (seed, class, instance) alone. Parameters
are drawn on the CPU from ``np.random.default_rng([seed, class, instance])``; the renderer is exact
on any device and batch (:mod:`datasets.fractal_render`).

Class-id convention: pretraining uses classes ``[0, num_classes)`` with ``num_classes <=
HELDOUT_CLASS_OFFSET``; held-out target classes start at ``HELDOUT_CLASS_OFFSET`` (10000), so the two
sets are disjoint by construction for any seed.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.fractal_ifs import IFS, MAX_MAPS, MIN_MAPS, check_int, perturb_ifs, sample_contractive_map
from datasets.fractal_render import (
    RENDER_MODES,
    InstanceParams,
    PackedInstances,
    RenderConfig,
    filling_ratio,
    pack_instances,
    render_instances,
)
from datasets.classification import (
    ClassificationSplits,
    classification_task_data,
    normalize_uint8,
    options_info,
    random_resized_crop_flip,
)
from datasets.registry import TaskData, register_task

HELDOUT_CLASS_OFFSET = 10_000


@functools.lru_cache(maxsize=65536)
def sample_class_ifs(seed: int, class_id: int, fill_threshold: float = 0.1, fill_size: int = 32,
                     fill_points: int = 4000, max_tries: int = 1000) -> IFS:
    """The IFS of one class: random contractive maps that pass the filling-ratio filter.

    Deterministic from (seed, class_id): the same class is the same system in every process.

    Args:
        seed: generator seed (>= 0).
        class_id: class index (>= 0).
        fill_threshold: minimum fraction of pixels covered by a ``fill_size`` binary render with
            ``fill_points`` points; 0 disables the filter.
        fill_size, fill_points: resolution and point count of that coarse render.
        max_tries: candidate systems tried before giving up.
    Returns:
        The class's :class:`IFS`.
    """
    check_int("seed", seed, 0)
    check_int("class_id", class_id, 0)
    if not 0.0 <= fill_threshold < 1.0:
        raise ValueError(f"fill_threshold must be in [0, 1), got {fill_threshold!r}")
    rng = np.random.default_rng([int(seed), int(class_id)])
    for _ in range(max_tries):
        m = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
        ifs = IFS.from_maps(np.stack([sample_contractive_map(rng) for _ in range(m)]))
        if fill_threshold <= 0 or filling_ratio(ifs, fill_size, fill_points) >= fill_threshold:
            return ifs
    raise RuntimeError(f"no IFS with filling ratio >= {fill_threshold} in {max_tries} tries "
                       f"(seed={seed}, class={class_id}); lower fill_threshold")


# ----------------------------------------------------------------------------------------------
# generator and dataset
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FractalGenerator:
    """Deterministic (class, instance) -> image map for one seed and one set of render settings.

    Attributes:
        seed: generator seed; classes of different seeds are unrelated.
        render: :class:`RenderConfig`.
        noise_std: per-parameter instance noise (see :func:`perturb_ifs`).
        fill_threshold, fill_size, fill_points: the class filter (see :func:`sample_class_ifs`).
    """

    seed: int = 0
    render: RenderConfig = field(default_factory=RenderConfig)
    noise_std: float = 0.05
    fill_threshold: float = 0.1
    fill_size: int = 32
    fill_points: int = 4000

    def __post_init__(self):
        check_int("seed", self.seed, 0)
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if not 0.0 <= self.fill_threshold < 1.0:
            raise ValueError(f"fill_threshold must be in [0, 1), got {self.fill_threshold!r}")

    def class_ifs(self, class_id: int) -> IFS:
        """The unperturbed system of ``class_id``."""
        return sample_class_ifs(self.seed, int(class_id), self.fill_threshold, self.fill_size, self.fill_points)

    def instance_params(self, class_id: int, instance: int) -> InstanceParams:
        """All random choices of image (class_id, instance), from ``default_rng([seed, class, instance])``."""
        check_int("instance", instance, 0)
        rng = np.random.default_rng([self.seed, int(class_id), int(instance)])
        ifs = perturb_ifs(self.class_ifs(class_id), rng, self.noise_std)
        color = rng.uniform(0.2, 1.0, size=3)
        color = color / color.max()
        k = self.render.splat_size
        if self.render.splat_random:
            splat = (rng.random((k, k)) < 0.5).astype(np.float64)
            splat[k // 2, k // 2] = 1.0
        else:
            splat = np.ones((k, k))
        return InstanceParams(ifs=ifs, key=int(rng.integers(0, 2**32)), color=color, splat=splat)

    def instance_params_many(self, class_ids: Sequence[int], instances: Sequence[int],
                             workers: int = 0) -> PackedInstances:
        """:meth:`instance_params` of many images, packed, optionally drawn in ``workers`` CPU processes.

        Why processes: drawing a class (its filling-ratio filter) and an instance costs ~15 ms and
        ~0.4 ms of single-threaded numpy, so the ~10^5 images of a pretraining set would keep the CPU
        busy for a minute while the GPU renders them in seconds. Results are identical for any
        ``workers``: every draw depends on (seed, class, instance) only.

        Args:
            class_ids, instances: length-B sequences of non-negative ints.
            workers: processes (0 or 1: in this process; small requests always run here).
        """
        if len(class_ids) != len(instances):
            raise ValueError(f"class_ids and instances differ in length: {len(class_ids)} vs {len(instances)}")
        check_int("workers", workers, 0)
        pairs = [(int(c), int(i)) for c, i in zip(class_ids, instances)]
        if workers <= 1 or len(pairs) < _PARALLEL_MIN_ITEMS:
            return _params_chunk((self, pairs))
        # Contiguous chunks keep one class in few workers (each worker draws a class once, then caches it).
        size = math.ceil(len(pairs) / (4 * workers))
        chunks = [pairs[s:s + size] for s in range(0, len(pairs), size)]
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread_worker) as pool:
            parts = list(pool.map(_params_chunk, [(self, chunk) for chunk in chunks]))
        return PackedInstances.concat(parts)

    def render_images(self, class_ids: Sequence[int], instances: Sequence[int],
                      device: torch.device | str = "cpu", batch_size: int = 64, workers: int = 0) -> torch.Tensor:
        """Render images (class_ids[i], instances[i]) in batches.

        Args:
            class_ids, instances: length-B sequences of non-negative ints.
            device: render device; the result stays there.
            batch_size: instances per chaos-game batch (memory ~ batch_size * num_points * 8 bytes).
            workers: CPU processes drawing the instance parameters (see :meth:`instance_params_many`).
        Returns:
            ``[B, C, S, S]`` float32 in ``[0, 1]``.
        """
        check_int("batch_size", batch_size, 1)
        params = self.instance_params_many(class_ids, instances, workers)  # packed: slicing is free
        outs = [render_instances(params[s:s + batch_size], self.render, device)
                for s in range(0, len(params), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.render.channels, self.render.image_size,
                                                        self.render.image_size, device=device)


_PARALLEL_MIN_ITEMS = 256  # below this, starting processes costs more than it saves


def _single_thread_worker() -> None:
    """Process-pool initializer: one torch thread per worker (the filling filter renders with torch),
    as DataLoader workers do, so forked workers neither oversubscribe cores nor reuse the parent's pool."""
    torch.set_num_threads(1)


def _params_chunk(job: Tuple[FractalGenerator, List[Tuple[int, int]]]) -> PackedInstances:
    gen, pairs = job
    return pack_instances([gen.instance_params(c, i) for c, i in pairs])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise ``[0, 1]`` images to uint8, as a stored FractalDB PNG would be.

    Why: cached and on-the-fly samples are then bit-identical, and a cache takes 4x less memory.
    """
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class FractalDataset(Dataset):
    """FractalDB-style classification set: ``num_classes`` x ``instances_per_class`` images.

    Item ``i`` is class ``class_offset + i // instances_per_class``, instance
    ``instance_offset + i % instances_per_class``, labelled ``i // instances_per_class``. Disjoint
    instance ranges give disjoint train/val/test splits of the same classes; a class offset gives
    classes the pretraining never saw.

    Args:
        num_classes: classes (>= 1).
        instances_per_class: images per class (>= 1).
        image_size: height = width (>= 1).
        seed: generator seed.
        class_offset: first class id.
        instance_offset: first instance id.
        num_points, steps, burn_in, mode, color, splat_size, splat_random: see :class:`RenderConfig`.
        noise_std, fill_threshold: see :class:`FractalGenerator`.
        cache: render everything at construction (on ``device``) and keep uint8 images in CPU memory.
        device: render device for the cache and :meth:`get_batch`.
        batch_size: instances rendered together (GPU memory ~ batch_size * num_points * 8 bytes).
        augment: random resized crop + flip of every item and batch (training splits only); the
            stored or rendered image itself stays deterministic.
        workers: CPU processes drawing instance parameters for large renders.
    Items:
        ``([3, H, W] float32 normalised with ImageNet mean/std, label int)``; grayscale renders are
        repeated over 3 channels.
    """

    def __init__(self, num_classes: int, instances_per_class: int, image_size: int, seed: int = 0,
                 class_offset: int = 0, instance_offset: int = 0, num_points: int = 100_000, steps: int = 50,
                 burn_in: int = 20, mode: str = "binary", color: bool = True, splat_size: int = 1,
                 splat_random: bool = False, noise_std: float = 0.05, fill_threshold: float = 0.1,
                 cache: bool = False, device: torch.device | str = "cpu", batch_size: int = 64,
                 augment: bool = False, workers: int = 0):
        check_int("num_classes", num_classes, 1)
        check_int("instances_per_class", instances_per_class, 1)
        check_int("image_size", image_size, 1)
        check_int("class_offset", class_offset, 0)
        check_int("instance_offset", instance_offset, 0)
        check_int("workers", workers, 0)
        self.num_classes = int(num_classes)
        self.instances_per_class = int(instances_per_class)
        self.class_offset = int(class_offset)
        self.instance_offset = int(instance_offset)
        self.device = device
        self.batch_size = batch_size
        self.augment = bool(augment)
        self.workers = int(workers)
        render = RenderConfig(image_size=image_size, num_points=num_points, steps=steps, burn_in=burn_in,
                              mode=mode, color=color, splat_size=splat_size, splat_random=splat_random)
        self.generator = FractalGenerator(seed=seed, render=render, noise_std=noise_std,
                                          fill_threshold=fill_threshold)
        self._cache: Optional[torch.Tensor] = None
        if cache:
            self._cache = self.render_uint8(range(len(self)))[0].cpu()

    def __len__(self) -> int:
        return self.num_classes * self.instances_per_class

    def _ids(self, index: int) -> Tuple[int, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} fractal images")
        index %= len(self)
        label = index // self.instances_per_class
        return self.class_offset + label, self.instance_offset + index % self.instances_per_class, label

    @property
    def targets(self) -> List[int]:
        """Labels of all items, in order (for stratified subsets)."""
        return [i // self.instances_per_class for i in range(len(self))]

    def render_uint8(self, indices: Sequence[int], device: torch.device | str | None = None,
                     batch_size: Optional[int] = None, workers: Optional[int] = None,
                     progress: Optional[Callable[[int], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` as stored images, without augmentation or normalisation.

        Stage 0 keeps a whole pretraining set like this in GPU memory (150 kB per 224 px image, 4x
        less than float32) and normalises each batch as it trains. Each render batch is quantised
        as soon as it is drawn, so the float32 images never exist all at once.

        Args:
            indices: B item indices.
            device: render device (default: the dataset's ``device``).
            batch_size: instances per chaos-game batch (default: the dataset's); larger batches keep
                a GPU busy (~3 MB of GPU memory per 224 px instance at 100k points).
            workers: CPU processes drawing instance parameters (default: the dataset's).
            progress: called with the number of images finished after every render batch.
        Returns:
            ``(images [B, 3, H, W] uint8, labels [B] int64)`` on the render device.
        """
        ids = [self._ids(int(i)) for i in indices]
        dev = torch.device(self.device if device is None else device)
        bs = batch_size or self.batch_size
        check_int("batch_size", bs, 1)
        packed = self.generator.instance_params_many([c for c, _, _ in ids], [k for _, k, _ in ids],
                                                     self.workers if workers is None else workers)
        size = self.generator.render.image_size
        out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8, device=dev)
        for s in range(0, len(ids), bs):
            img = render_instances(packed[s:s + bs], self.generator.render, dev)
            out[s:s + bs] = to_uint8(img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img)
            if progress is not None:
                progress(img.shape[0])
        return out, torch.tensor([label for _, _, label in ids], dtype=torch.int64, device=dev)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> (augmented) normalised float32."""
        if self.augment:
            images = random_resized_crop_flip(images.float())
        return normalize_uint8(images)

    def get_batch(self, indices: Sequence[int], device: torch.device | str | None = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` rendered together (fast on GPU): the same values as indexing one by one.

        Args:
            indices: B item indices.
            device: render device (default: the dataset's ``device``); ignored when cached.
        Returns:
            ``(x [B, 3, H, W] float32 normalised, y [B] int64)``, on the CPU if cached else on the
            render device. With ``augment`` each call draws new crops.
        """
        if self._cache is not None:
            labels = torch.tensor([self._ids(int(i))[2] for i in indices], dtype=torch.int64)
            return self._finish(self._cache[list(indices)]), labels
        images, labels = self.render_uint8(indices, device)
        return self._finish(images), labels

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        _, _, label = self._ids(index)
        image = self._cache[index] if self._cache is not None else self.render_uint8([index])[0][0].cpu()
        return self._finish(image[None])[0], label


# ----------------------------------------------------------------------------------------------
# registered tasks
# ----------------------------------------------------------------------------------------------
@dataclass
class _FractalCommonOptions:
    """Fields shared by both fractal tasks; pretraining and held-out runs must agree on the render
    fields (seed, num_points, mode, color, splat_*, noise_std, fill_threshold) for the held-out gap to
    be only "unseen classes"."""

    image_size: int = field(default=224, metadata={"help": "image height = width in pixels"})
    seed: int = field(default=0, metadata={"help": "fractal generator seed (classes depend on it)"})
    num_points: int = field(default=100_000, metadata={"help": "chaos-game points per image"})
    mode: str = field(default="binary", metadata={"help": "pixel intensity: binary | density"})
    color: bool = field(default=True, metadata={"help": "one random colour per instance (else grayscale)"})
    splat_size: int = field(default=1, metadata={"help": "odd k: draw each point as a k x k patch"})
    splat_random: bool = field(default=False, metadata={"help": "random k x k pattern per instance (FractalDB patch)"})
    noise_std: float = field(default=0.05, metadata={"help": "std of the per-parameter instance noise"})
    fill_threshold: float = field(default=0.1, metadata={"help": "minimum filling ratio of a class (0 disables)"})
    cache: bool = field(default=False, metadata={"help": "render all images once at build time (uint8 in RAM)"})
    augment: bool = field(default=False, metadata={
        "help": "random resized crop + flip of training items (stage 0 applies it to its GPU-resident set)"})
    device: str = field(default="cpu", metadata={"help": "render device, e.g. cuda (for cache / get_batch)"})

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("num_classes", "train_per_class", "val_per_class", "test_per_class", "image_size",
                     "num_points", "splat_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{cls}.seed must be an integer >= 0, got {self.seed!r}")
        if self.mode not in RENDER_MODES:
            raise ValueError(f"{cls}.mode must be one of {RENDER_MODES}, got {self.mode!r}")
        if self.splat_size % 2 == 0:
            raise ValueError(f"{cls}.splat_size must be odd, got {self.splat_size}")
        if not self.noise_std >= 0:
            raise ValueError(f"{cls}.noise_std must be >= 0, got {self.noise_std!r}")
        if not 0.0 <= self.fill_threshold < 1.0:
            raise ValueError(f"{cls}.fill_threshold must be in [0, 1), got {self.fill_threshold!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"{cls}.device must be a torch device string such as 'cpu' or 'cuda:0', "
                             f"got {self.device!r}") from None

    def first_class(self) -> int:
        return 0


@dataclass
class FractalOptions(_FractalCommonOptions):
    """Options of the ``fractal`` pretraining task: classes ``[0, num_classes)``."""

    num_classes: int = field(default=1000, metadata={
        "help": f"fractal classes (FractalDB-1k uses 1000); <= {HELDOUT_CLASS_OFFSET} so held-out classes stay unseen"})
    train_per_class: int = field(default=100, metadata={"help": "training instances per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation instances per class"})
    test_per_class: int = field(default=10, metadata={"help": "test instances per class"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes > HELDOUT_CLASS_OFFSET:
            raise ValueError(f"FractalOptions.num_classes must be <= {HELDOUT_CLASS_OFFSET} (held-out classes start "
                             f"there), got {self.num_classes}")


@dataclass
class FractalHeldoutOptions(_FractalCommonOptions):
    """Options of ``fractal_heldout``: classes ``[class_offset, class_offset + num_classes)``, which
    no ``fractal`` run can use (its classes stay below ``HELDOUT_CLASS_OFFSET``)."""

    num_classes: int = field(default=100, metadata={"help": "held-out fractal classes"})
    train_per_class: int = field(default=50, metadata={"help": "training instances per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation instances per class"})
    test_per_class: int = field(default=20, metadata={"help": "test instances per class"})
    class_offset: int = field(default=HELDOUT_CLASS_OFFSET, metadata={
        "help": f"first class id; >= {HELDOUT_CLASS_OFFSET} so pretraining classes are never reused"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.class_offset, bool) or not isinstance(self.class_offset, int) \
                or self.class_offset < HELDOUT_CLASS_OFFSET:
            raise ValueError(f"FractalHeldoutOptions.class_offset must be an integer >= {HELDOUT_CLASS_OFFSET} "
                             f"(pretraining uses classes below it), got {self.class_offset!r}")

    def first_class(self) -> int:
        return self.class_offset


def _fractal_splits(opts: _FractalCommonOptions) -> ClassificationSplits:
    """Train/val/test as disjoint instance ranges [0, n_tr), [n_tr, n_tr + n_val), ... of each class."""
    common = dict(num_classes=opts.num_classes, image_size=opts.image_size, seed=opts.seed,
                  class_offset=opts.first_class(), num_points=opts.num_points, mode=opts.mode, color=opts.color,
                  splat_size=opts.splat_size, splat_random=opts.splat_random, noise_std=opts.noise_std,
                  fill_threshold=opts.fill_threshold, cache=opts.cache, device=opts.device)
    n_tr, n_val = opts.train_per_class, opts.val_per_class
    return ClassificationSplits(
        train=FractalDataset(instances_per_class=n_tr, instance_offset=0, augment=opts.augment, **common),
        val=FractalDataset(instances_per_class=n_val, instance_offset=n_tr, **common),
        test=FractalDataset(instances_per_class=opts.test_per_class, instance_offset=n_tr + n_val, **common),
        num_classes=opts.num_classes)


def _fractal_info(opts: _FractalCommonOptions, kind: str) -> dict:
    info = options_info(opts)
    first = opts.first_class()
    info.update(source=f"FractalDB-style IFS ({kind})", classes=[first, first + opts.num_classes],
                normalization="imagenet")
    return info


@register_task("fractal", FractalOptions)
def build_fractal(opts: FractalOptions, data_root: str) -> TaskData:
    """FractalDB-style pretraining classification over classes [0, num_classes) (no files needed)."""
    return classification_task_data(_fractal_splits(opts), _fractal_info(opts, "pretraining"))


@register_task("fractal_heldout", FractalHeldoutOptions)
def build_fractal_heldout(opts: FractalHeldoutOptions, data_root: str) -> TaskData:
    """Small-gap target: fractal classes from 10000 on, disjoint from any pretraining class."""
    return classification_task_data(_fractal_splits(opts), _fractal_info(opts, "held-out classes"))
