"""The synthetic audio task: spectrograms that put each family's energy where its parameters say."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import datasets
from datasets.registry import build_task
from datasets.tones import (
    FAMILIES, SAMPLE_RATE, TonesOptions, render, spectrogram, tones_split_indices, waveform,
)
from orca.config import load_config

CLEAN = dict(snr_db_min=30.0, snr_db_max=30.0)


def _peak_hz(spec: np.ndarray, n_fft: int) -> np.ndarray:
    """Per frame, the frequency (Hz) of the brightest row (row 0 is the top = the highest bin)."""
    rows = spec.shape[0] - 1 - spec.argmax(axis=0)
    return rows * SAMPLE_RATE / n_fft


def test_registered_and_deterministic_per_seed_and_index():
    assert "tones" in datasets.TASKS.names()
    opts = TonesOptions(**CLEAN)
    np.testing.assert_array_equal(waveform(opts, 7), waveform(opts, 7))
    assert not np.allclose(waveform(opts, 7), waveform(TonesOptions(seed=1, **CLEAN), 7))
    assert not np.allclose(waveform(opts, 7), waveform(opts, 17))  # same family, other parameters


def test_pure_tone_lands_in_the_bin_of_its_drawn_frequency():
    opts = TonesOptions(**CLEAN)
    for i in (0, 10, 20):  # family 0
        f = np.random.default_rng([opts.seed, i]).uniform(300, 3000)  # pure_tone's first draw
        spec = spectrogram(waveform(opts, i), opts.n_fft, opts.db_range)
        assert spec.shape == (opts.n_fft // 2 + 1, 8000 // (opts.n_fft // 4) + 1)
        bin_hz = SAMPLE_RATE / opts.n_fft
        assert np.all(np.abs(_peak_hz(spec, opts.n_fft)[2:-2] - f) <= bin_hz)
        assert spec.max() == 255


@pytest.mark.parametrize("index,rising", [(1, True), (2, False)])
def test_chirps_sweep_in_their_direction(index, rising):
    opts = TonesOptions(**CLEAN)
    peak = _peak_hz(spectrogram(waveform(opts, index), opts.n_fft, opts.db_range), opts.n_fft)[2:-2]
    steps = np.diff(peak)
    assert (steps >= 0).mean() > 0.95 if rising else (steps <= 0).mean() > 0.95
    assert abs(peak[-1] - peak[0]) > 1000  # the drawn ranges are at least 1000 Hz apart


def test_noise_level_follows_the_snr():
    loud, quiet = TonesOptions(snr_db_min=20.0, snr_db_max=20.0), TonesOptions(snr_db_min=-10.0, snr_db_max=-10.0)
    for opts, snr in ((loud, 20.0), (quiet, -10.0)):
        x = waveform(opts, 0)
        rng = np.random.default_rng([opts.seed, 0])
        clean = FAMILIES[0][1](rng, np.arange(8000) / SAMPLE_RATE)
        noise = x - clean
        assert 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2)) == pytest.approx(snr, abs=0.3)


def test_classes_differ_nearest_class_mean_beats_chance():
    opts = TonesOptions(n_per_class=40, snr_db_min=10.0, snr_db_max=20.0)
    images, labels = render(opts)
    assert images.dtype == torch.uint8 and images.shape[:2] == (400, 3)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 40))
    x = images[:, 0].float().reshape(len(images), -1)
    idx = tones_split_indices(opts)
    train, test = torch.from_numpy(idx["train"]), torch.from_numpy(idx["test"])
    means = torch.stack([x[train][labels[train] == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(x[test], means).argmin(1) == labels[test]).float().mean()
    assert accuracy > 0.3  # chance is 0.1


def test_splits_fixed_disjoint_stratified_and_the_task_builds():
    opts = TonesOptions(n_per_class=20, image_size=32)
    a, b = tones_split_indices(opts), tones_split_indices(opts)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    parts = [set(a[k].tolist()) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(200))
    assert all(np.all(np.bincount(a[k] % 10, minlength=10) == len(a[k]) // 10) for k in a)
    task = build_task("tones", opts, "unused")
    x, y = task.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert task.out_shape == (10,) and task.info["families"][1] == "chirp_up"
    assert (len(task.train), len(task.val), len(task.test)) == (140, 30, 30)


@pytest.mark.parametrize("override,message", [
    ("task.options.n_fft=250", "n_fft must be an integer >= 16 divisible by 4"),
    ("task.options.snr_db_min=30", "snr_db_min=30"),
    ("task.options.db_range=0", "db_range must be > 0"),
    ("task.options.n_per_class=0", "n_per_class must be an integer >= 1"),
    ("task.options.n_fftt=256", "did you mean 'n_fft'"),
])
def test_bad_options_are_clear_errors(override, message):
    with pytest.raises(Exception, match=message):
        load_config(None, ["task.name=tones", override])
