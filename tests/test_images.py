"""Offline image tasks (natural_patches, digits), the CIFAR loaders' splits and offline error, helpers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets
from datasets import build_task, images
from datasets.errors import DataFileError
from datasets.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIMAGE_PHOTOS,
    CifarOptions,
    DigitsOptions,
    NaturalPatchesOptions,
    classification_error,
    digits_split_indices,
    natural_patch_table,
)

EXPECTED_TASKS = {"fractal", "fractal_heldout", "natural_patches", "digits", "tones", "cifar10", "cifar100"}


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_image_tasks_are_registered():
    assert EXPECTED_TASKS <= set(datasets.TASKS.names())


# ------------------------------------------------------------------------------------------------
# natural_patches
# ------------------------------------------------------------------------------------------------
def test_all_listed_photos_ship_with_scikit_image():
    # Every allowed photo must load from the installed package (the task promises no network).
    table = natural_patch_table(NaturalPatchesOptions(photos=SKIMAGE_PHOTOS, image_size=16))
    assert sorted(set(table.labels.tolist())) == list(range(len(SKIMAGE_PHOTOS)))
    assert table.patches.dtype == torch.uint8 and table.patches.shape[1:] == (3, 32, 32)


def test_natural_patches_splits_fixed_disjoint_and_stratified():
    opts = NaturalPatchesOptions(image_size=24)
    a, b = natural_patch_table(opts), natural_patch_table(NaturalPatchesOptions(image_size=24))
    for name in ("train", "val", "test"):
        assert np.array_equal(a.splits[name], b.splits[name])
    assert torch.equal(a.patches, b.patches)
    sets = {k: set(v.tolist()) for k, v in a.splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"] | sets["val"] | sets["test"]) == len(a.labels)
    for name, idx in a.splits.items():  # every photo (class) in every split
        assert set(a.labels[idx].tolist()) == set(range(len(opts.photos))), name
    # Spatially disjoint: no pixel of one photo lies in patches of two different splits.
    for label in range(len(opts.photos)):
        owner = {}
        for split, idx in a.splits.items():
            for i in idx[a.labels[idx].numpy() == label]:
                top, left, bottom, right = a.boxes[i]
                for y in range(top, bottom, 8):  # patches are on a grid of 32, so probing every 8 px suffices
                    for x in range(left, right, 8):
                        assert owner.setdefault((y, x), split) == split


def test_another_split_seed_gives_another_split():
    a = natural_patch_table(NaturalPatchesOptions(image_size=16))
    b = natural_patch_table(NaturalPatchesOptions(image_size=16, split_seed=1))
    assert not np.array_equal(a.splits["test"], b.splits["test"])


def test_natural_patches_task_items(tmp_path):
    task = build_task("natural_patches", NaturalPatchesOptions(photos=("astronaut", "camera", "coffee"), image_size=40),
                      str(tmp_path))
    assert task.kind == "classification" and task.out_shape == (3,) and task.in_channels == 3
    x, y = task.test[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and 0 <= y < 3
    raw = _unnormalise(x)
    assert raw.min() >= -1e-3 and raw.max() <= 1 + 1e-3 and raw.std() > 0.01
    # camera is grayscale: its patches are repeated over 3 equal channels.
    cam = next(task.train[i][0] for i in range(len(task.train)) if task.train[i][1] == 1)
    raw = _unnormalise(cam)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(photos=("astronaut",)), "photos must be >= 2 distinct names"),
    (dict(photos=("astronaut", "eagle")), "photos must be >= 2 distinct names"),
    (dict(patch_size=0), "patch_size must be an integer >= 1, got 0"),
    (dict(val_fraction=0.6, test_fraction=0.5), "must be < 1"),
    (dict(interpolation="lanczos"), "interpolation must be one of"),
    (dict(patch_size=200), "photo_short_side"),
])
def test_natural_patches_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        NaturalPatchesOptions(**kw)


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------
def test_digits_splits_fixed_disjoint_stratified():
    from sklearn.datasets import load_digits

    y = load_digits().target
    a, b = digits_split_indices(DigitsOptions()), digits_split_indices(DigitsOptions())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(allidx) == len(set(allidx.tolist())) == len(y) == 1797
    for name, frac in (("val", 0.15), ("test", 0.2)):
        counts = np.bincount(y[a[name]], minlength=10)
        expected = frac * np.bincount(y, minlength=10)
        assert np.all(np.abs(counts - expected) <= 1), (name, counts, expected)
    assert not np.array_equal(a["test"], digits_split_indices(DigitsOptions(split_seed=1))["test"])


def test_digits_task_upsamples(tmp_path):
    task = build_task("digits", DigitsOptions(image_size=32), str(tmp_path))
    assert len(task.train) + len(task.val) + len(task.test) == 1797 and task.out_shape == (10,)
    x, y = task.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    raw = _unnormalise(x)
    assert raw.min() >= -1e-3 and raw.max() <= 1 + 1e-3 and raw.max() > 0.5  # strokes are bright


# ------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, folder, archive", [
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
])
def test_cifar_offline_error_names_the_directory(tmp_path, name, folder, archive):
    root = tmp_path / "data"
    with pytest.raises(DataFileError) as err:
        build_task(name, CifarOptions(image_size=32, download=False), str(root))
    msg = str(err.value)
    assert str(root.resolve()) in msg and f"'{folder}/'" in msg and archive in msg and "download=true" in msg


def test_cifar_val_is_carved_from_train(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)

    def fake(n):
        return SimpleNamespace(data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                               targets=[i % 10 for i in range(n)])

    train, test = fake(500), fake(100)
    monkeypatch.setattr(images, "_load_cifar", lambda name, root, download: (train, test))
    opts = CifarOptions(image_size=16, val_size=50)
    task = build_task("cifar10", opts, str(tmp_path))
    again = build_task("cifar10", opts, str(tmp_path))
    assert (len(task.train), len(task.val), len(task.test)) == (450, 50, 100)
    assert np.array_equal(task.val.indices, again.val.indices)
    assert not set(task.val.indices.tolist()) & set(task.train.indices.tolist())
    assert task.val.images is task.train.images  # validation comes from train, never test
    assert np.bincount(task.val.targets, minlength=10).tolist() == [5] * 10
    x, y = task.test[3]
    assert x.shape == (3, 16, 16) and y == 3


@pytest.mark.parametrize("kw, match", [(dict(val_size=0), "val_size must be an integer >= 1"),
                                       (dict(val_size=50000), "val_size must be < 50000"),
                                       (dict(image_size=-1), "image_size")])
def test_cifar_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        CifarOptions(**kw)


def test_augment_keeps_shape_and_changes_pixels():
    imgs = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    ds = images.ImageTensorDataset(imgs, torch.zeros(1, dtype=torch.int64), [0], 16, augment=True)
    plain = images.ImageTensorDataset(imgs, torch.zeros(1, dtype=torch.int64), [0], 16)
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(8)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert any(not torch.equal(o, plain[0][0]) for o in outs)


def test_batched_crop_flip_is_seeded_and_full_area_is_identity_or_mirror():
    imgs = torch.rand(6, 3, 12, 12) * 255
    full = images.random_resized_crop_flip(imgs, min_area=1.0, generator=torch.Generator().manual_seed(0))
    for out, img in zip(full, imgs):  # a full-area crop only flips (bilinear at pixel centres is exact)
        assert torch.allclose(out, img, atol=1e-3) or torch.allclose(out, img.flip(-1), atol=1e-3)
    a = images.random_resized_crop_flip(imgs, 0.3, torch.Generator().manual_seed(1))
    b = images.random_resized_crop_flip(imgs, 0.3, torch.Generator().manual_seed(1))
    assert a.shape == imgs.shape and torch.equal(a, b)
    assert not torch.equal(a, images.random_resized_crop_flip(imgs, 0.3, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="min_area must be in"):
        images.random_resized_crop_flip(imgs, 0.0)


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def test_classification_error_is_per_sample_zero_one():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert classification_error(logits, torch.tensor([0, 0, 0])).tolist() == [0.0, 1.0, 0.0]


def test_source_feature_set_from_digits_and_too_many():
    with pytest.raises(ValueError, match="asked for 5000 images"):
        images.source_feature_set("digits", n=5000, image_size=8)
    x, y = images.source_feature_set("digits", n=12, image_size=8, seed=1)
    assert x.shape == (12, 3, 8, 8) and y.shape == (12,)


def test_presized_items_equal_on_access_items():
    imgs = torch.randint(0, 256, (5, 3, 9, 11), dtype=torch.uint8)
    labels = torch.arange(5)
    lazy = images.ImageTensorDataset(imgs, labels, [4, 0, 2], 20)
    eager = images.ImageTensorDataset(imgs, labels, [4, 0, 2], 20, presize=True)
    assert eager._presized.shape == (3, 3, 20, 20) and eager._presized.dtype == torch.uint8
    for i in range(3):
        (a, ya), (b, yb) = lazy[i], eager[i]
        assert torch.equal(a, b) and ya == yb


def test_presize_with_augmentation_is_refused():
    imgs = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="presize=True needs augment=False"):
        images.ImageTensorDataset(imgs, torch.zeros(1, dtype=torch.int64), [0], 16, augment=True, presize=True)
