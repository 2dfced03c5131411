"""The gap dial: an exact, nested, seeded pixel permutation of the source fractals; level 0 is the source."""
import subprocess
import sys

import pytest
import torch

from datasets.fractal import FractalDataset
from datasets.fractal_dial import DIAL_INSTANCE_OFFSET, DIAL_LEVELS, FractalDialOptions, dial_scramble
from datasets.registry import build_task
from orca.schema import ConfigError, from_dict

SMALL = dict(num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32, num_points=1500,
             patch_size=8)


def _task(level, **kw):
    return build_task("fractal_dial", FractalDialOptions(level=level, **{**SMALL, **kw}), "data")


def test_scramble_is_an_exact_bijection_with_the_planned_share_of_squares():
    x = torch.rand(2, 3, 32, 32)
    for level in range(DIAL_LEVELS):
        s = dial_scramble(level, image_size=32, patch_size=8, seed=3)
        assert sorted(s.perm.tolist()) == list(range(32 * 32))  # a permutation
        assert torch.equal(s.inverse()(s(x)), x) and torch.equal(s(s.inverse()(x)), x)
        # pixels stay in their 8 px square: the square index of every source pixel equals its target's
        src_sq = (s.perm // 32 // 8) * 4 + (s.perm % 32) // 8
        dst = torch.arange(32 * 32)
        assert torch.equal(src_sq, (dst // 32 // 8) * 4 + (dst % 32) // 8)
        changed_squares = {int(q) for q in src_sq[s.perm != dst]}
        expected = round(level / (DIAL_LEVELS - 1) * 16)
        # a scrambled 64-pixel square keeps every pixel in place with probability ~1/64!: it changes
        assert len(changed_squares) == expected
    assert dial_scramble(0, 32, 8).moved == 0 and dial_scramble(DIAL_LEVELS - 1, 32, 8).moved > 0.9 * 32 * 32


def test_scramble_is_nested_and_deterministic():
    prev = dial_scramble(0, 32, 8, seed=1)
    for level in range(1, DIAL_LEVELS):
        cur = dial_scramble(level, 32, 8, seed=1)
        moved_before = prev.perm != torch.arange(32 * 32)
        assert torch.equal(cur.perm[moved_before], prev.perm[moved_before])  # earlier squares unchanged
        assert cur.moved > prev.moved
        prev = cur
    assert torch.equal(dial_scramble(4, 32, 8, seed=1).perm, dial_scramble(4, 32, 8, seed=1).perm)
    assert not torch.equal(dial_scramble(4, 32, 8, seed=1).perm, dial_scramble(4, 32, 8, seed=2).perm)


def test_level0_is_the_source_data_exactly_and_labels_never_change():
    t0, t5 = _task(0), _task(5)
    src = FractalDataset(3, 2, 32, num_points=1500, instance_offset=DIAL_INSTANCE_OFFSET)
    for i in range(len(src)):
        x, y = t0.train[i]
        xs, ys = src[i]
        assert torch.equal(x, xs) and y == ys
        x5, y5 = t5.train[i]
        assert y5 == y and not torch.equal(x5, x)
        assert torch.equal(dial_scramble(5, 32, 8).inverse()(x5), x)  # same image under the bijection
    xb, yb = t5.test.get_batch([0, 1, 2])
    assert torch.equal(xb, torch.stack([t5.test[i][0] for i in range(3)]))
    assert yb.tolist() == [t5.test[i][1] for i in range(3)]
    assert t5.info["pixels_moved"] == dial_scramble(5, 32, 8).moved


def test_same_seed_same_data():
    a, b = _task(3), _task(3)
    assert all(torch.equal(a.val[i][0], b.val[i][0]) for i in range(len(a.val)))
    c = _task(3, dial_seed=1)
    assert not torch.equal(a.val[0][0], c.val[0][0])


@pytest.mark.parametrize("level, message", [
    (-1, rf"task\.options: FractalDialOptions\.level must be an integer in \[0, {DIAL_LEVELS - 1}\]"),
    (DIAL_LEVELS, rf"task\.options: FractalDialOptions\.level must be an integer in \[0, {DIAL_LEVELS - 1}\]"),
    (2.5, r"task\.options\.level: expected an integer, got 2\.5"),
])
def test_bad_level_is_a_config_error(level, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(FractalDialOptions, {"level": level}, "task.options")


def test_bad_level_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "dial.yaml"
    cfg.write_text("task:\n  name: fractal_dial\n  options: {level: 9}\n")
    proc = subprocess.run([sys.executable, "-m", "orca", "stage3", "--config", str(cfg)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "FractalDialOptions.level" in lines[0]
    assert "Traceback" not in proc.stderr


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match="patch_size must be a positive divisor of image_size=32"):
        FractalDialOptions(**{**SMALL, "patch_size": 6})
