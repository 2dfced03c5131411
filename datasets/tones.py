"""``tones``: synthetic audio, classified from its spectrogram -- a fifth offline modality.

Why: hypothesis (b) is a rank correlation of gap and knee over tasks, and with n tasks the best
possible two-sided permutation p is 2/n!, under 0.05 only from n = 5 on. Held-out fractals, digits,
natural patches and Darcy are four. Sound is a modality none of them is: a spectrogram is an image
whose axes are time and frequency, whose content is lines and bands, not shapes. ORCA's own benchmark
mixes such tasks (audio, ECG, satellite series) with images, and PDEs. Where it lands between the
others is for stage 2 to measure, not for us to assume.

Each item is one second of 8 kHz audio from one of ten signal families (``FAMILIES``) with random
parameters, plus white noise at a random SNR, turned into a log-magnitude STFT (Hann window,
``n_fft`` points, hop ``n_fft / 4``), clipped to the top ``db_range`` decibels, stored as a uint8
image with low frequencies at the bottom and resized to ``image_size`` on the way to the model, like
every image task (``datasets.images``). Item i depends only on (``seed``, i), its class is
i mod 10, so classes are balanced and the fixed stratified splits come from ``split_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from datasets.classification import (
    ClassificationSplits,
    ImageTensorDataset,
    SplitOptions,
    check_split_options,
    classification_task_data,
    options_info,
    stratified_split,
)
from datasets.registry import TaskData, register_task

SAMPLE_RATE = 8000
DURATION_S = 1.0

Signal = Callable[[np.random.Generator, np.ndarray], np.ndarray]


def _tone(f: np.ndarray | float, t: np.ndarray, phase: float) -> np.ndarray:
    return np.sin(phase + 2 * np.pi * np.cumsum(np.broadcast_to(f, t.shape)) / SAMPLE_RATE)


def pure_tone(rng, t):
    return _tone(rng.uniform(300, 3000), t, rng.uniform(0, 2 * np.pi))


def chirp_up(rng, t):
    f0, f1 = rng.uniform(200, 1200), rng.uniform(2200, 3600)
    return _tone(f0 + (f1 - f0) * t / DURATION_S, t, rng.uniform(0, 2 * np.pi))


def chirp_down(rng, t):
    f0, f1 = rng.uniform(2200, 3600), rng.uniform(200, 1200)
    return _tone(f0 + (f1 - f0) * t / DURATION_S, t, rng.uniform(0, 2 * np.pi))


def two_tones(rng, t):
    f1 = rng.uniform(300, 1500)
    f2 = f1 + rng.uniform(600, 2000)
    return 0.5 * (_tone(f1, t, rng.uniform(0, 2 * np.pi)) + _tone(f2, t, rng.uniform(0, 2 * np.pi)))


def harmonic_stack(rng, t):
    f0 = rng.uniform(120, 400)
    k = np.arange(1, 7)
    amps = rng.uniform(0.6, 1.0) ** (k - 1)
    return sum(a * _tone(n * f0, t, rng.uniform(0, 2 * np.pi)) for n, a in zip(k, amps)) / amps.sum()


def amplitude_modulated(rng, t):
    rate, depth = rng.uniform(4, 12), rng.uniform(0.7, 1.0)
    envelope = 1 - depth * 0.5 * (1 + np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    return envelope * pure_tone(rng, t)


def frequency_modulated(rng, t):
    fc, rate, dev = rng.uniform(800, 2800), rng.uniform(3, 8), rng.uniform(150, 500)
    return _tone(fc + dev * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)), t, rng.uniform(0, 2 * np.pi))


def click_train(rng, t):
    period = int(SAMPLE_RATE / rng.uniform(6, 20))
    x = np.zeros_like(t)
    x[rng.integers(0, period)::period] = 1.0
    return x * np.sqrt(period / 2)  # about the power of a unit sine


def band_noise(rng, t):
    fc, bw = rng.uniform(600, 3000), rng.uniform(150, 500)
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    freqs = np.fft.rfftfreq(t.size, 1 / SAMPLE_RATE)
    x = np.fft.irfft(spectrum * (np.abs(freqs - fc) < bw / 2), n=t.size)
    return x / (x.std() * np.sqrt(2) + 1e-12)


def tone_bursts(rng, t):
    n = int(rng.integers(3, 7))
    on = np.zeros_like(t)
    for start in np.sort(rng.uniform(0, DURATION_S - 0.08, n)):
        on[(t >= start) & (t < start + rng.uniform(0.04, 0.08))] = 1.0
    return on * pure_tone(rng, t)


#: The ten classes, in label order.
FAMILIES: Tuple[Tuple[str, Signal], ...] = (
    ("pure_tone", pure_tone), ("chirp_up", chirp_up), ("chirp_down", chirp_down), ("two_tones", two_tones),
    ("harmonic_stack", harmonic_stack), ("amplitude_modulated", amplitude_modulated),
    ("frequency_modulated", frequency_modulated), ("click_train", click_train), ("band_noise", band_noise),
    ("tone_bursts", tone_bursts),
)


@dataclass
class TonesOptions(SplitOptions):
    """Options of ``tones`` (synthetic audio as spectrogram images, 10 classes)."""

    n_per_class: int = field(default=300, metadata={"help": "items per signal family (10 families)"})
    snr_db_min: float = field(default=-10.0, metadata={"help": "lowest signal-to-noise ratio of an item (dB)"})
    snr_db_max: float = field(default=10.0, metadata={"help": "highest signal-to-noise ratio of an item (dB)"})
    n_fft: int = field(default=256, metadata={"help": "STFT window (Hann) length; hop = n_fft / 4"})
    db_range: float = field(default=80.0, metadata={"help": "decibels below each item's peak kept in the image"})
    seed: int = field(default=0, metadata={"help": "item i depends only on (seed, i)"})

    def __post_init__(self):
        check_split_options(self, ("n_per_class", "image_size"), ("val_fraction", "test_fraction"))
        if isinstance(self.n_fft, bool) or not isinstance(self.n_fft, int) or self.n_fft < 16 or self.n_fft % 4:
            raise ValueError(f"TonesOptions.n_fft must be an integer >= 16 divisible by 4, got {self.n_fft!r}")
        if not self.snr_db_min <= self.snr_db_max:
            raise ValueError(f"TonesOptions: snr_db_min={self.snr_db_min!r} must be <= snr_db_max={self.snr_db_max!r}")
        if not self.db_range > 0:
            raise ValueError(f"TonesOptions.db_range must be > 0, got {self.db_range!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TonesOptions.seed must be an integer >= 0, got {self.seed!r}")


def waveform(opts: TonesOptions, index: int) -> np.ndarray:
    """Item ``index``'s one second of audio (float64, family ``index % 10``, noise included)."""
    rng = np.random.default_rng([opts.seed, index])
    t = np.arange(int(SAMPLE_RATE * DURATION_S)) / SAMPLE_RATE
    signal = FAMILIES[index % len(FAMILIES)][1](rng, t)
    snr_db = rng.uniform(opts.snr_db_min, opts.snr_db_max)
    noise_std = np.sqrt(np.mean(signal ** 2) / 10 ** (snr_db / 10))
    return signal + noise_std * rng.standard_normal(t.size)


def spectrogram(x: np.ndarray, n_fft: int, db_range: float) -> np.ndarray:
    """``[n_fft/2 + 1, frames]`` uint8: log magnitude over the top ``db_range`` dB, low frequencies last
    (the bottom row of the image), 0 = ``db_range`` below the peak or quieter, 255 = the peak."""
    window = torch.hann_window(n_fft, dtype=torch.float64)
    s = torch.stft(torch.from_numpy(x), n_fft, hop_length=n_fft // 4, window=window, center=True,
                   return_complex=True).abs()
    db = 20 * torch.log10(s.clamp_min(1e-12))
    level = ((db - db.max()) / db_range + 1).clamp(0, 1)
    return (level.flip(0) * 255).round().to(torch.uint8).numpy()


def render(opts: TonesOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """All items: ``[N, 3, F, T]`` uint8 spectrograms (one channel repeated) and ``[N]`` labels."""
    n = opts.n_per_class * len(FAMILIES)
    images = np.stack([spectrogram(waveform(opts, i), opts.n_fft, opts.db_range) for i in range(n)])
    labels = torch.arange(n, dtype=torch.int64) % len(FAMILIES)
    return torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1), labels


def tones_split_indices(opts: TonesOptions) -> Dict[str, np.ndarray]:
    """The fixed stratified train/val/test item indices."""
    labels = np.arange(opts.n_per_class * len(FAMILIES)) % len(FAMILIES)
    return dict(zip(("train", "val", "test"), stratified_split(labels, opts.split_fractions(), opts.split_seed)))


@register_task("tones", TonesOptions)
def build_tones(opts: TonesOptions, data_root: str) -> TaskData:
    """Synthetic audio classified from spectrograms: a non-image modality, generated offline."""
    images, labels = render(opts)
    idx = tones_split_indices(opts)

    def make(split: str) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, idx[split], opts.image_size, opts.interpolation,
                                  presize=opts.presize)

    splits = ClassificationSplits(make("train"), make("val"), make("test"), num_classes=len(FAMILIES))
    info = dict(options_info(opts), source="generated (datasets/tones.py)", normalization="imagenet",
                families=[name for name, _ in FAMILIES], sample_rate=SAMPLE_RATE)
    return classification_task_data(splits, info)
