"""One key per behaviour: stage 0's keys live in ``pretrain``, paged AdamW is ``train.optimizer=paged_adamw``
alone, and configs written before either change (every run directory's config.yaml) still load; a
``choices`` check reads the registry or table of what it names."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from orca.adapters import AdapterConfig
from orca.adapters.optim import OPTIMIZERS, build_optimizer
from orca.align.objectives import OBJECTIVES
from orca.cli import CONFIG_SCHEMA
from orca.config import MOVED_KEYS, PretrainConfig, TrainConfig, config_dict, load_config
from orca.runtime import AMP_MODES, autocast_for
from orca.schema import ConfigError
from orca.sweep import load_sweep
from orca.train import config_differences
from rank_estimation.config import DEFAULT_METRICS
from rank_estimation.gaps import GAP_METRICS

REPO = Path(__file__).resolve().parents[1]
STAGE0_MIM_RUN = REPO / "results/runs/stage0/stage0__fractal__fractal_swin_mim__s0__20261204-014916"


def test_stage0_keys_are_their_own_section():
    pretrain = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert pretrain == {"time_budget_s", "label_smoothing", "mim_weight", "mim_mask_ratio", "mim_mask_patch"}
    assert not pretrain & {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(MOVED_KEYS) == {f"train.{k}" for k in pretrain}
    assert "paged_adamw" not in {f.name for f in dataclasses.fields(AdapterConfig)}


def test_a_run_directory_written_before_the_move_still_loads():
    """The committed classes + SimMIM body's config.yaml: train.mim_* and adapter.paged_adamw: false."""
    text = (STAGE0_MIM_RUN / "config.yaml").read_text()
    assert "  mim_weight: 1.0" in text and "  paged_adamw: false" in text
    cfg = load_config(str(STAGE0_MIM_RUN / "config.yaml"), schema=CONFIG_SCHEMA)
    assert dataclasses.asdict(cfg.pretrain) == {"time_budget_s": 480.0, "label_smoothing": 0.1, "mim_weight": 1.0,
                                               "mim_mask_ratio": 0.6, "mim_mask_patch": 32}
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == pytest.approx(1e-3)
    resolved = config_dict(cfg)
    assert "mim_weight" not in resolved["train"] and "paged_adamw" not in resolved["adapter"]


def test_old_keys_move_in_yaml_overrides_and_sweeps(tmp_path):
    cfg = load_config(None, ["train.mim_weight=0.5", "train.time_budget_s=60"], schema=CONFIG_SCHEMA)
    assert (cfg.pretrain.mim_weight, cfg.pretrain.time_budget_s) == (0.5, 60)
    sweep = tmp_path / "old.yaml"
    sweep.write_text("train: {label_smoothing: 0.2, epochs: 2, warmup_epochs: 1}\nadapter: {paged_adamw: true}\n"
                     f"sweep: {{table: t, output_dir: {tmp_path}, grid: {{seed: [0, 1]}}}}\n")
    _, runs = load_sweep(sweep, schema=CONFIG_SCHEMA)
    assert [(r.cfg.pretrain.label_smoothing, r.cfg.train.optimizer, r.cfg.train.epochs) for r in runs] == \
        [(0.2, "paged_adamw", 2)] * 2


def test_paged_adamw_is_one_switch():
    assert load_config(None, ["train.optimizer=paged_adamw"]).train.optimizer == "paged_adamw"
    assert load_config(None, ["adapter.paged_adamw=true"]).train.optimizer == "paged_adamw"  # an old config
    assert load_config(None, ["adapter.paged_adamw=false", "train.optimizer=sgd"]).train.optimizer == "sgd"


@pytest.mark.parametrize("overrides,message", [
    (["train.mim_weight=0.5", "pretrain.mim_weight=1.0"],
     "train.mim_weight has moved to pretrain.mim_weight, and this config gives both (0.5 and 1.0): keep pretrain.mim_weight only"),
    (["adapter.paged_adamw=true", "train.optimizer=sgd"],
     "adapter.paged_adamw=true asks for paged AdamW but train.optimizer='sgd': paged AdamW is now "
     "train.optimizer=paged_adamw alone; remove adapter.paged_adamw"),
    (["adapter.paged_adamw=2"], "adapter.paged_adamw=2: paged AdamW is now train.optimizer=paged_adamw"),
    (["pretrain.mim_weigth=1.0"], "unknown config key 'pretrain.mim_weigth'"),
])
def test_conflicting_old_and_new_keys_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_begun_before_the_move_resumes_without_a_difference(tmp_path):
    """Resuming compares the run's saved config.yaml in today's keys (orca.train.config_differences)."""
    saved = tmp_path / "config.yaml"
    saved.write_text("train: {optimizer: adamw, time_budget_s: 30.0}\nadapter: {paged_adamw: true}\n")
    cfg = load_config(str(saved), schema=CONFIG_SCHEMA)
    assert (cfg.train.optimizer, cfg.pretrain.time_budget_s) == ("paged_adamw", 30.0)
    assert config_differences(saved, cfg) == []
    cfg.pretrain.time_budget_s = 60.0
    assert config_differences(saved, cfg) == ["pretrain.time_budget_s: 30.0 there, 60.0 here"]


# ----------------------------------------------------------------------------- choices read their registries
def _registered(monkeypatch, registry, name):
    monkeypatch.setitem(registry._entries, name, object())  # a plug-in registered at import time


def test_alignment_objective_choices_are_the_registry(monkeypatch):
    for name in OBJECTIVES.names():
        assert load_config(None, [f"align.objective={name}"]).align.objective == name
    with pytest.raises(ConfigError, match="align.objective"):
        load_config(None, ["align.objective=wasserstein_plugin"])
    _registered(monkeypatch, OBJECTIVES, "wasserstein_plugin")
    assert load_config(None, ["align.objective=wasserstein_plugin"]).align.objective == "wasserstein_plugin"


def test_gap_metric_choices_are_the_registry(monkeypatch):
    assert set(DEFAULT_METRICS) <= set(GAP_METRICS.names())
    assert {"mmd_source", "sliced_w2_source"} <= set(GAP_METRICS.names())  # beyond the default measured set
    for name in GAP_METRICS.names():
        assert load_config(None, [f"rank.gap_metric={name}", f"rank.metrics=[{name}]"], schema=CONFIG_SCHEMA).rank.gap_metric == name
    with pytest.raises(ConfigError, match="rank.metrics: unknown gap metric 'energy_plugin'"):
        load_config(None, ["rank.metrics=[mmd, energy_plugin]"], schema=CONFIG_SCHEMA)
    _registered(monkeypatch, GAP_METRICS, "energy_plugin")
    assert load_config(None, ["rank.metrics=[mmd, energy_plugin]"], schema=CONFIG_SCHEMA).rank.metrics == ("mmd", "energy_plugin")


def test_optimizer_and_amp_choices_are_what_their_builders_take():
    for name in OPTIMIZERS:
        assert load_config(None, [f"train.optimizer={name}"]).train.optimizer == name
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=lion"])
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "lion", lr=1e-3)
    for mode in AMP_MODES:
        assert load_config(None, [f"train.amp='{mode}'"]).train.amp == mode  # quoted: YAML reads off as false
        assert autocast_for(mode, torch.device("cpu")) is not None
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=fp8"])
