"""Target presets: one table (orca.adapters.targets) that stage 2's rank.targets and stage 3's
adapter.targets both read, so a preset names the same module set in every stage."""
from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from orca.adapters import AdapterConfig, build_method, lora_layers, resolve_ranks
from orca.adapters.targets import TARGET_PRESETS, target_linears
from orca.config import load_config
from orca.schema import ConfigError
from rank_estimation.allocate import costs_from_model, swin_linear_costs
from rank_estimation.config import Stage2Config
from rank_estimation.stage import stage3_coverage
from tests.conftest import Stand

load_full = functools.partial(load_config, schema=Stage2Config)


def swin(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def stage2_modules(body: nn.Module, preset: str):
    """The modules stage 2 spends its budget over (rank_estimation.stage: costs_from_model(body, rank.targets))."""
    return list(costs_from_model(body, load_full(None, [f"rank.targets={preset}"]).rank.targets))


def stage3_modules(body: nn.Module, preset: str):
    """The modules stage 3 adapts at a uniform rank (orca.adapters.lora.resolve_ranks on adapter.targets), in
    module order (resolve_ranks lists them pattern by pattern, the order their A matrices are drawn in)."""
    return sorted(resolve_ranks(body, load_full(None, [f"adapter.targets={preset}"]).adapter.target_patterns(), 4))


@pytest.mark.parametrize("model,kwargs,blocks,merges", [
    ("swin_base_patch4_window7_224", {}, 24, 3),                                          # Swin-B
    ("swin_tiny_patch4_window7_224", dict(embed_dim=64, depths=(2, 2, 6, 2)), 12, 3),      # the fractal body
])
def test_both_stages_resolve_each_preset_to_one_module_list(model, kwargs, blocks, merges):
    body = swin(model, **kwargs)
    expected = {"attn": 2 * blocks, "blocks": 4 * blocks, "all": 4 * blocks + merges}
    assert set(expected) == set(TARGET_PRESETS)
    for preset, count in expected.items():
        two, three = stage2_modules(body, preset), stage3_modules(body, preset)
        assert two == target_linears(body, preset) and sorted(two) == three
        assert len(two) == count
    everything = [n for n, m in body.named_modules() if isinstance(m, nn.Linear)]
    assert stage2_modules(body, "all") == everything  # every body Linear, the patch-merging reductions included
    assert sum(n.endswith("downsample.reduction") for n in everything) == merges


def test_swin_b_all_is_99_linears_in_every_stage():
    body = swin("swin_base_patch4_window7_224")
    everything = stage2_modules(body, "all")
    assert len(everything) == len(stage3_modules(body, "all")) == 99
    assert list(swin_linear_costs(targets="all")) == everything  # the analytic table agrees
    model = Stand(nn.Identity(), body, nn.Identity())
    build_method(AdapterConfig(rank=2, targets="all")).prepare(model)
    assert sorted(lora_layers(model.body)) == sorted(everything)


def test_a_stage2_map_over_all_covers_stage3_all():
    """Equal budgets: a rank map over rank.targets=all leaves nothing of adapter.targets=all at the uniform rank."""
    body = swin("swin_base_patch4_window7_224")
    rank_map = {name: 4 for name in stage2_modules(body, "all")}
    assert stage3_coverage(body, AdapterConfig(targets="all"), rank_map) == []
    attn_map = {name: 4 for name in stage2_modules(body, "attn")}
    assert len(stage3_coverage(body, AdapterConfig(targets="all"), attn_map)) == 99 - 48


@pytest.mark.parametrize("key", ["adapter.targets", "rank.targets"])
def test_the_renamed_preset_is_a_one_line_error_naming_the_new_one(key):
    with pytest.raises(ConfigError) as err:
        load_full(None, [f"{key}=all+downsample"])
    message = str(err.value)
    assert "\n" not in message and "'all+downsample' is now called 'all'" in message and f"{key}=all" in message


@pytest.mark.parametrize("key", ["adapter.targets", "rank.targets"])
def test_an_unknown_preset_names_the_presets(key):
    with pytest.raises(ConfigError, match="'all', 'attn', 'blocks'|attn, blocks, all"):
        load_full(None, [f"{key}=mlp"])
