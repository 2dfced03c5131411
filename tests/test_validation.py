"""Numbers that cannot be meant, names that are not plain, and runs that would train nothing are
config errors naming the key (exit 2), refused before any file is written."""
from __future__ import annotations

import pytest

from orca import cli
from orca.config import load_config
from orca.schema import ConfigError
from orca.train import check_steps


@pytest.mark.parametrize("override, line", [
    ("train.lr=.nan", "error: nan is not a finite number, train.lr, give a finite number (no nan or inf)"),
    ("train.lr=.inf", "error: inf is not a finite number, train.lr, give a finite number (no nan or inf)"),
    ("train.weight_decay=.nan", "error: nan is not a finite number, train.weight_decay, give a finite number (no nan or inf)"),
    ("train.betas=[0.9,.inf]", "error: inf is not a finite number, train.betas[1], give a finite number (no nan or inf)"),
    ("train.clip_grad=-1", "error: -1.0 is out of range, train.clip_grad, give a value > 0"),
    ("train.num_workers=-5", "error: -5 is out of range, train.num_workers, give a value >= 0"),
    ("train.save_every_steps=-2", "error: -2 is out of range, train.save_every_steps, give a value >= 1"),
    ("train.max_steps_per_epoch=-1", "error: -1 is out of range, train.max_steps_per_epoch, give a value >= 1"),
    ("train.max_steps_per_epoch=0", "error: 0 is out of range, train.max_steps_per_epoch, give a value >= 1"),
    ("train.betas=[0.9,1.5]", "error: (0.9, 1.5) is out of range, train.betas, give a value >= 0 and < 1"),
    ("train.lr=0", "error: 0.0 is out of range, train.lr, give a value > 0"),
    ("seed=-1", "error: -1 is out of range, seed, give a value >= 0"),
    ("model.img_size=0", "error: 0 is out of range, model.img_size, give a value >= 1"),
    ("adapter.delta_lora_lambda=-1", "error: -1.0 is out of range, adapter.delta_lora_lambda, give a value >= 0"),
    ("task.options.a_high=.nan", "error: nan is not a finite number, task.options.a_high, give a finite number (no nan or inf)"),
    ("rank.sigma=.inf", "error: inf is not a finite number, rank.sigma, give a finite number (no nan or inf)"),
    ("name=a/../../x", "error: 'a/../../x' is not a plain name, name, give one path component: letters, digits, - _ . (no / and not ..)"),
    ("name=..", "error: '..' is not a plain name, name, give one path component: letters, digits, - _ . (no / and not ..)"),
])
def test_meaningless_values_are_refused_naming_the_key(tmp_path, capsys, override, line):
    assert cli.main(["stage3", f"output_dir={tmp_path / 'runs'}", override]) == 2
    err = capsys.readouterr().err
    assert err == line + "\n"
    assert list(tmp_path.iterdir()) == []


def test_valid_edges_are_accepted():
    cfg = load_config(None, ["train.num_workers=0", "train.weight_decay=0", "train.max_steps_per_epoch=1",
                             "train.clip_grad=0.5", "name=darcy-lora_r8.v2", "train.betas=[0,0.999]", "seed=0"])
    assert (cfg.train.num_workers, cfg.train.max_steps_per_epoch, cfg.train.clip_grad) == (0, 1, 0.5)
    assert cfg.name == "darcy-lora_r8.v2" and cfg.train.betas == (0.0, 0.999)


def test_a_run_that_would_take_no_step_is_refused_before_its_directory(tmp_path, capsys, tiny_overrides):
    """24 training samples in batches of 16 make 2 micro-batches, fewer than 4 to accumulate: 0 steps.
    A batch larger than the set is one partial batch, a step (compiled or not)."""
    assert cli.main(["stage3", *tiny_overrides, "train.batch_size=16", "train.grad_accum=4"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("error: this run would take no optimizer step: 24 training samples make 2 batches of 16 "
                    "per epoch, fewer than train.grad_accum=4, "
                    "train.batch_size, lower train.batch_size or train.grad_accum, or train on more samples")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="make 3 batches of 8 per epoch, fewer than train.grad_accum=4"):
        check_steps(load_config(None, [*tiny_overrides, "train.grad_accum=4"]), 24)
    check_steps(load_config(None, [*tiny_overrides, "train.batch_size=32", "train.compile=true"]), 24)
