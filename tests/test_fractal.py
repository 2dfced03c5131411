"""FractalDB-style generator and the ``fractal`` / ``fractal_heldout`` tasks.

Tiny renders (32 px, a few thousand points) keep the file under a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets import build_task, fractal_ifs
from datasets.fractal import (
    HELDOUT_CLASS_OFFSET,
    FractalDataset,
    FractalGenerator,
    FractalHeldoutOptions,
    FractalOptions,
    sample_class_ifs,
)
from datasets.fractal_ifs import IFS
from datasets.fractal_render import InstanceParams, RenderConfig, filling_ratio, instance_points
from datasets.images import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8, source_feature_set

SMALL = dict(image_size=32, num_points=3000)


def _gen(seed: int = 0, **render) -> FractalGenerator:
    return FractalGenerator(seed=seed, render=RenderConfig(**{**SMALL, **render}))


def _tiny_opts(cls=FractalOptions, **kw):
    base = dict(num_classes=4, train_per_class=3, val_per_class=2, test_per_class=2, image_size=32, num_points=2000)
    return cls(**{**base, **kw})


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
def test_same_ids_same_image_whatever_the_batch():
    gen = _gen(mode="density")
    pairs = [(0, 0), (3, 7), (1, 2), (0, 1), (5, 0)]
    ref = gen.render_images([c for c, _ in pairs], [i for _, i in pairs], batch_size=len(pairs))
    rev = gen.render_images([c for c, _ in pairs[::-1]], [i for _, i in pairs[::-1]], batch_size=2)
    one = torch.cat([gen.render_images([c], [i]) for c, i in pairs])
    assert torch.equal(ref, rev.flip(0))
    assert torch.equal(ref, one)
    # A fresh process would start with an empty class cache: the class must be re-derived identically.
    sample_class_ifs.cache_clear()
    assert torch.equal(ref, _gen(mode="density").render_images([c for c, _ in pairs], [i for _, i in pairs]))


def test_seed_class_and_instance_all_change_the_image():
    gen = _gen()
    base = gen.render_images([2], [0])
    assert not torch.equal(base, gen.render_images([2], [1]))  # another instance
    assert not torch.equal(base, gen.render_images([3], [0]))  # another class
    assert not torch.equal(base, _gen(seed=1).render_images([2], [0]))  # another seed


def test_dataset_item_equals_batch_and_cache():
    kw = dict(num_classes=3, instances_per_class=2, image_size=24, seed=0, num_points=1500)
    lazy = FractalDataset(**kw)
    cached = FractalDataset(cache=True, **kw)
    xb, yb = lazy.get_batch(range(len(lazy)))
    for i in range(len(lazy)):
        x, y = lazy[i]
        xc, yc = cached[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32
        assert torch.equal(x, xb[i]) and torch.equal(x, xc)
        assert y == yc == int(yb[i]) == i // 2


def test_parallel_packed_params_and_uint8_render_match_the_serial_path():
    gen = _gen(num_points=500, image_size=16)
    cls, inst = [i // 100 for i in range(300)], [i % 100 for i in range(300)]
    serial, parallel = gen.instance_params_many(cls, inst), gen.instance_params_many(cls, inst, workers=2)
    for f in ("maps", "thresholds", "start", "keys", "colors", "splats"):
        assert np.array_equal(getattr(serial, f), getattr(parallel, f)), f
    ds = FractalDataset(3, 100, 16, num_points=500)
    done = []
    u8, labels = ds.render_uint8(range(0, 300, 7), batch_size=16, workers=2, progress=done.append)
    assert u8.dtype == torch.uint8 and sum(done) == len(u8) == len(labels) == 43
    xb, yb = ds.get_batch(range(0, 300, 7))
    assert torch.equal(xb, normalize_uint8(u8)) and torch.equal(yb, labels)


def test_augment_applies_to_training_items_only(tmp_path):
    task = build_task("fractal", _tiny_opts(augment=True), str(tmp_path))
    assert task.train.augment and not task.val.augment and not task.test.augment
    torch.manual_seed(0)
    assert not torch.equal(task.train.get_batch([0, 1])[0], task.train.get_batch([0, 1])[0])
    assert torch.equal(task.val[0][0], task.val[0][0])


def test_items_are_imagenet_normalised_rgb():
    x, _ = FractalDataset(2, 1, 16, num_points=1000)[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = x * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.allclose(raw.amin(), torch.tensor(0.0), atol=1e-5)  # black background survives


# ------------------------------------------------------------------------------------------------
# the chaos game itself
# ------------------------------------------------------------------------------------------------
def test_map_selection_follows_probabilities():
    # Two constant maps (A = 0) send every point to (0, 0) or (1, 1): each point *is* its map choice,
    # so the fraction of points at (1, 1) must be p = 0.8 (binomial sd at 40k points is 0.002).
    maps = np.array([[0, 0, 0, 0, 0.0, 0.0], [0, 0, 0, 0, 1.0, 1.0]])
    params = InstanceParams(ifs=IFS(maps=maps, probs=np.array([0.2, 0.8])), key=12345,
                            color=np.ones(3), splat=np.ones((1, 1)))
    xs, ys = instance_points([params], RenderConfig(num_points=40000))
    assert xs.shape == (1, 40000)
    assert torch.equal(xs, ys) and bool(((xs == 0) | (xs == 1)).all())
    assert abs(xs.mean().item() - 0.8) < 0.01


def test_points_fill_a_known_attractor():
    # Four half-scale maps tile the unit square, whose attractor is the whole square: with 8 points per
    # pixel, coverage is ~1 - exp(-8); a line-shaped attractor covers about one pixel per column.
    square = IFS.from_maps(np.array([[0.5, 0, 0, 0.5, tx, ty] for tx in (0, 0.5) for ty in (0, 0.5)]))
    line = IFS.from_maps(np.array([[0.5, 0, 0.5, 0, 0, 0], [0.5, 0, 0.5, 0, 0.5, 0.5]]))
    assert filling_ratio(square, size=32, num_points=8192) > 0.98
    assert filling_ratio(line, size=32, num_points=8192) < 0.1


@pytest.mark.parametrize("size", [16, 32, 64, 224])
def test_images_non_empty_at_every_size(size):
    gen = _gen(image_size=size, num_points=20000 if size == 224 else 3000)
    imgs = gen.render_images([0, 1, 7], [0, 4, 2])
    assert imgs.shape == (3, 3, size, size)
    on = (imgs.amax(dim=1) > 0).float().mean(dim=(1, 2))
    assert bool((on > 0.02).all()) and bool((on < 0.98).all()), on


def test_grayscale_and_splatting():
    gray = _gen(color=False).render_images([0], [0])
    assert gray.shape == (1, 1, 32, 32)
    one = _gen(color=False, num_points=300).render_images([0], [0])
    big = _gen(color=False, num_points=300, splat_size=3).render_images([0], [0])
    rnd = _gen(color=False, num_points=300, splat_size=3, splat_random=True).render_images([0], [0])
    # A 3x3 square covers every pixel a 1-pixel point covers, and more; a random pattern lies between.
    assert bool((big >= one).all()) and big.sum() > one.sum()
    assert bool((rnd >= one).all()) and bool((rnd <= big).all())


def test_filling_filter_rejects_sparse_classes():
    unfiltered = [filling_ratio(sample_class_ifs(0, c, fill_threshold=0.0)) for c in range(30)]
    filtered = [filling_ratio(sample_class_ifs(0, c, fill_threshold=0.3)) for c in range(30)]
    assert min(unfiltered) < 0.3  # the filter has something to reject at this seed
    assert min(filtered) >= 0.3, filtered
    # Another chaos-game key moves the estimate only a little (the bounding box follows extreme points).
    assert min(filling_ratio(sample_class_ifs(0, c, fill_threshold=0.3), key=99) for c in range(30)) > 0.2


def test_classes_sample_2_to_8_maps_and_stay_contractive():
    counts = [sample_class_ifs(0, c).num_maps for c in range(60)]
    assert min(counts) >= 2 and max(counts) <= 8 and len(set(counts)) >= 4
    gen = _gen()
    for c in range(5):
        p = gen.instance_params(c, 3)
        lin = p.ifs.maps[:, :4].reshape(-1, 2, 2)
        assert np.linalg.svd(lin, compute_uv=False).max() <= fractal_ifs.MAX_SIGMA + 1e-9
        assert np.isclose(p.ifs.probs.sum(), 1.0)
        # An instance is a perturbation of its class, not a new system.
        assert p.ifs.num_maps == gen.class_ifs(c).num_maps
        assert 0 < np.abs(p.ifs.maps - gen.class_ifs(c).maps).max() < 0.5


def test_nearest_class_mean_beats_chance_on_raw_pixels():
    # 10 classes x 20 instances: class means from 10 instances, classify the other 10.
    n_cls, n_inst = 10, 20
    ds = FractalDataset(n_cls, n_inst, 32, seed=0, num_points=3000, color=False)
    x, y = ds.get_batch(range(len(ds)))
    x = x.reshape(len(ds), -1)
    is_train = torch.tensor([i % n_inst < n_inst // 2 for i in range(len(ds))])
    means = torch.stack([x[is_train & (y == c)].mean(0) for c in range(n_cls)])
    pred = torch.cdist(x[~is_train], means).argmin(1)
    acc = (pred == y[~is_train]).float().mean().item()
    assert acc > 2 * (1 / n_cls), acc


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=-3), "num_classes"),
    (dict(instances_per_class=0), "instances_per_class"), (dict(image_size=0), "image_size"),
])
def test_dataset_rejects_non_positive_sizes(kw, field):
    args = {**dict(num_classes=2, instances_per_class=2, image_size=16), **kw}
    with pytest.raises(ValueError, match=field):
        FractalDataset(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
    (dict(mode="sparkly"), "mode must be one of"),
    (dict(splat_size=2), "splat_size must be odd"),
    (dict(num_classes=HELDOUT_CLASS_OFFSET + 1), "held-out classes start"),
    (dict(device="gpu0"), "device must be a torch device"),
])
def test_fractal_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny_opts(**kw)


def test_heldout_options_refuse_pretraining_classes():
    with pytest.raises(ValueError, match="class_offset must be an integer >= 10000"):
        _tiny_opts(FractalHeldoutOptions, class_offset=5)


# ------------------------------------------------------------------------------------------------
# registered tasks
# ------------------------------------------------------------------------------------------------
def _ids(ds: FractalDataset):
    return {ds._ids(i)[:2] for i in range(len(ds))}


def test_fractal_task_splits_are_fixed_and_disjoint(tmp_path):
    task = build_task("fractal", _tiny_opts(), str(tmp_path))
    again = build_task("fractal", _tiny_opts(), str(tmp_path))
    assert task.kind == "classification" and task.in_channels == 3 and task.out_shape == (4,)
    assert task.metric_name == "error"
    ids = {s: _ids(getattr(task, s)) for s in ("train", "val", "test")}
    assert ids == {s: _ids(getattr(again, s)) for s in ("train", "val", "test")}
    assert [len(v) for v in ids.values()] == [12, 8, 8]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert torch.equal(task.test[5][0], again.test[5][0])


def test_heldout_classes_are_disjoint_from_pretraining(tmp_path):
    pre = build_task("fractal", _tiny_opts(num_classes=HELDOUT_CLASS_OFFSET), str(tmp_path))
    held = build_task("fractal_heldout", _tiny_opts(FractalHeldoutOptions), str(tmp_path))
    pre_classes = {pre.train.class_offset, pre.train.class_offset + pre.train.num_classes - 1}
    held_classes = {c for c, _ in _ids(held.train) | _ids(held.val) | _ids(held.test)}
    assert max(pre_classes) < HELDOUT_CLASS_OFFSET <= min(held_classes)
    assert held.info["classes"] == [HELDOUT_CLASS_OFFSET, HELDOUT_CLASS_OFFSET + 4]
    # Labels restart at 0 so a head of num_classes outputs fits.
    assert sorted({y for _, y in (held.train[i] for i in range(len(held.train)))}) == [0, 1, 2, 3]


def test_task_loss_and_metric(tmp_path):
    task = build_task("fractal", _tiny_opts(), str(tmp_path))
    x, y = torch.utils.data.default_collate([task.train[i] for i in range(4)])
    assert x.shape == (4, 3, 32, 32)
    logits = torch.full((4, 4), -5.0)
    logits[torch.arange(4), y] = 5.0
    logits[0] = 0.0
    logits[0, (int(y[0]) + 1) % 4] = 1.0  # sample 0 wrong, the rest right
    err = task.metric(logits, y)
    assert err.shape == (4,) and err.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert task.loss(logits, y).ndim == 0 and task.loss(logits, y) > 0


def test_source_feature_set_from_fractals():
    x, y = source_feature_set("fractal", n=25, image_size=16, seed=3, options={"num_points": 800})
    x2, y2 = source_feature_set("fractal", n=25, image_size=16, seed=3, options={"num_points": 800})
    assert x.shape == (25, 3, 16, 16) and y.shape == (25,) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) >= 5
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        source_feature_set("fractal", n=0, image_size=16)


@pytest.mark.gpu
def test_cuda_render_matches_cpu():
    gen = _gen(mode="density", splat_size=3)
    cls, inst = [0, 4, 9, 2], [0, 1, 2, 3]
    assert torch.equal(gen.render_images(cls, inst), gen.render_images(cls, inst, device="cuda").cpu())
