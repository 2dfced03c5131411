"""Tests of stage 2's rank allocation: budget repair, Swin-B budgets, helpers, config and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from orca.adapters.targets import select_targets
from rank_estimation.allocate import (
    RankAllocation,
    allocate_from_config,
    allocate_ranks,
    costs_from_model,
    expand,
    fit_gamma,
    repair_budget,
    swin_linear_costs,
)
from rank_estimation.config import RankConfig

FAST = {"n_chains": 2, "n_sweeps": 60, "burn_in": 30}  # the budget is exact whatever the run length


def _depth_profile(names, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.0, 1.0, len(names))
    return {n: float(np.exp(spread * d + 0.2 * rng.standard_normal())) for n, d in zip(names, depth)}


# ---------------------------------------------------------------------------- Swin-B shapes and budgets
def test_swin_b_linear_shapes_match_timm():
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    with torch.device("meta"):  # shapes only: no weight initialisation
        model = timm.create_model("swin_base_patch4_window7_224", pretrained=False)
    for targets in ("all", "attn"):
        from_model = costs_from_model(model, targets)
        analytic = swin_linear_costs(targets=targets)
        assert list(from_model.items()) == list(analytic.items())
    costs = swin_linear_costs()
    assert len(costs) == 24 * 4 + 3
    assert sum(costs.values()) == 197_888  # parameters per unit of rank on all 99 Linear layers
    assert costs["layers.2.blocks.0.attn.qkv"] == 512 + 3 * 512
    assert costs["layers.1.downsample.reduction"] == 4 * 128 + 2 * 128


@pytest.mark.parametrize("budget", [100_000, 1_000_000, 5_000_000, 20_000_000])
def test_budget_is_met_within_one_unit_on_swin_b(budget):
    costs = swin_linear_costs()
    gaps = _depth_profile(list(costs))
    alloc = allocate_ranks(gaps, costs, budget, r_min=0, r_max=128, seed=1, **FAST)
    ranks = np.array(list(alloc.rank_map.values()))
    assert ranks.min() >= 0 and ranks.max() <= 128
    assert abs(alloc.trainable - budget) <= min(costs.values())
    assert alloc.trainable == sum(costs[n] * r for n, r in alloc.rank_map.items())
    assert alloc.tolerance == min(costs.values())


def test_budget_with_rank_floor_and_attention_targets():
    costs = swin_linear_costs(targets="attn")
    gaps = _depth_profile(list(costs), seed=2)
    budget = 3_000_000
    alloc = allocate_ranks(gaps, costs, budget, r_min=2, r_max=96, seed=3, **FAST)
    ranks = np.array(list(alloc.rank_map.values()))
    assert ranks.min() >= 2 and ranks.max() <= 96
    assert abs(alloc.trainable - budget) <= min(costs.values())


def test_ranks_follow_the_gaps():
    """Equal costs: equal gaps give ranks within one unit; clearly increasing gaps, non-decreasing ranks."""
    names = [f"m{i}" for i in range(8)]
    costs = {n: 1024 for n in names}
    equal = allocate_ranks({n: 2.0 for n in names}, costs, 1024 * 8 * 10, 1, 64, seed=4)
    assert max(equal.rank_map.values()) - min(equal.rank_map.values()) <= 1
    gaps = dict(zip(names, np.exp(np.linspace(0.0, 2.1, 8)).tolist()))
    inc = allocate_ranks(gaps, costs, 1024 * 8 * 10, 1, 64, seed=5)
    ranks = [inc.rank_map[n] for n in names]
    assert all(b >= a for a, b in zip(ranks, ranks[1:])), ranks
    assert ranks[-1] >= 3 * ranks[0], ranks
    assert inc.diagnostics["max_rhat"] < 1.05


# ---------------------------------------------------------------------------- budget repair
def test_repair_spends_on_the_most_probable_unit_per_parameter():
    # layer 0: P(r >= 3) = 0.9 at cost 100 -> 0.009 per parameter; layer 1: P(r >= 3) = 0.6 at cost 50
    # -> 0.012 per parameter, so with room for one cheap unit the cheap layer gets it.
    survival = np.array([[1, 1, 1, 0.9, 0.1, 0.0], [1, 1, 1, 0.6, 0.1, 0.0]])
    ranks, steps = repair_budget([2, 2], [100, 50], 300 + 50, survival, 0, 4)
    assert ranks.tolist() == [2, 3] and steps["added"] == 1
    # over budget by 100: free the unit with the smallest P(r_i >= r_i) / c_i first, layer 0's
    # 4th (0.1 / 100) rather than layer 1's 3rd (0.6 / 50)
    ranks, steps = repair_budget([4, 3], [100, 50], 450, survival, 0, 4)
    assert ranks.tolist() == [3, 3] and steps["removed"] == 1


def test_repair_swaps_when_the_cheapest_layers_are_saturated():
    # costs 2, 5, 7 with r_max = 1; ranks (1, 1, 0) spend 7 of 11. Nothing that can still grow
    # fits in the remaining 4, and the cheap layers are at r_max: only a swap gets within 2.
    survival = np.full((3, 3), 0.5)
    ranks, steps = repair_budget([1, 1, 0], [2, 5, 7], 11, survival, 0, 1)
    assert abs(int(np.dot([2, 5, 7], ranks)) - 11) <= 2
    assert steps["swapped"] >= 1 and set(ranks.tolist()) <= {0, 1}


# ---------------------------------------------------------------------------- helpers
def test_expand_maps_block_gaps_onto_linear_modules():
    names = list(swin_linear_costs(depths=(2, 2), embed_dim=16))
    block_gaps = {"layers.0.blocks.0": 1.0, "layers.0.blocks.1": 2.0,
                  "layers.1.blocks.0": 3.0, "layers.1.blocks.1": 4.0,
                  "layers.1.blocks.1.mlp.fc2": 9.0}  # an exact Linear key overrides its block
    out = expand(block_gaps, names)
    assert list(out) == names
    assert out["layers.0.blocks.1.attn.qkv"] == 2.0
    assert out["layers.1.downsample.reduction"] == 2.0  # reads the output of layers.0.blocks.1
    assert out["layers.1.blocks.1.mlp.fc1"] == 4.0 and out["layers.1.blocks.1.mlp.fc2"] == 9.0
    assert expand({"layers.1": 5.0, "layers.0": 1.0}, names)["layers.1.blocks.0.attn.qkv"] == 5.0
    with pytest.raises(ValueError, match="no gap for module 'layers.0.blocks.0.attn.qkv'"):
        expand({"layers.1.blocks.0": 1.0}, names)
    # a prefix must end at a dot: "layers.1" must not claim "layers.10..."
    assert expand({"layers.1": 1.0, "layers.10": 7.0}, ["layers.10.blocks.0.attn.qkv"])[
        "layers.10.blocks.0.attn.qkv"] == 7.0


def test_select_targets():
    names = list(swin_linear_costs(depths=(1, 1), embed_dim=16))
    assert len(names) == 9  # 2 blocks x (qkv, proj, fc1, fc2) + one patch merging
    assert select_targets(names, "attn") == [n for n in names if ".attn." in n]
    assert select_targets(names, "blocks") == [n for n in names if "downsample" not in n]
    assert select_targets(names, "all") == names
    with pytest.raises(ValueError, match="targets='mlp' is not a target preset"):
        select_targets(names, "mlp")


def test_fit_gamma_recovers_a_known_power_law():
    rng = np.random.default_rng(6)
    ranks = rng.integers(1, 65, 40)
    gamma, log_beta, sigma = 0.7, -1.5, 0.1
    gaps = np.exp(log_beta + gamma * np.log1p(ranks) + sigma * rng.standard_normal(40))
    fit = fit_gamma(list(zip(gaps, ranks)))
    assert abs(fit.gamma - gamma) <= 4 * fit.gamma_se
    assert abs(fit.sigma - sigma) < 0.05 and fit.n == 40
    named = fit_gamma({f"layer{i}": (g, r) for i, (g, r) in enumerate(zip(gaps, ranks))})
    assert named.gamma == pytest.approx(fit.gamma)
    with pytest.raises(ValueError, match="at least 3"):
        fit_gamma([(1.0, 2), (2.0, 4)])
    with pytest.raises(ValueError, match="not identifiable"):
        fit_gamma([(1.0, 8), (2.0, 8), (3.0, 8)])
    with pytest.raises(ValueError, match="gaps > 0"):
        fit_gamma([(0.0, 1), (2.0, 4), (3.0, 8)])


def test_allocation_json_round_trip(tmp_path):
    names = [f"m{i}" for i in range(5)]
    alloc = allocate_ranks(dict(zip(names, [1.0, 1.5, 2.0, 3.0, 5.0])), {n: 512 for n in names},
                           512 * 5 * 6, 0, 32, seed=7, **FAST)
    path = tmp_path / "ranks.json"
    text = alloc.to_json(path)
    assert RankAllocation.from_json(text) == alloc
    assert RankAllocation.from_json(path) == alloc
    assert set(alloc.diagnostics) >= {"max_rhat", "min_ess", "rhat", "calibration", "repair_steps"}
    assert all(lo <= alloc.posterior_mean[n] <= hi for n, (lo, hi) in alloc.intervals.items())
    assert alloc.prior["beta"] == pytest.approx(math.exp(alloc.prior["log_beta"]))


# ---------------------------------------------------------------------------- config
def test_rank_config_validation_names_field_value_and_allowed():
    assert RankConfig().summary == "mean"
    cases = [
        ({"r_min": 5, "r_max": 3}, "RankConfig.r_max=3"),
        ({"summary": "median"}, "RankConfig.summary='median' is not allowed; expected one of"),
        ({"targets": "mlp"}, "rank.targets='mlp' is not a target preset"),
        ({"sigma": -1.0}, "RankConfig.sigma=-1.0"),
        ({"alpha_prior": (1.0, 0.0)}, "RankConfig.alpha_prior"),
        ({"n_sweeps": 2}, "RankConfig.n_sweeps=2"),
        ({"budget": 1.5}, "RankConfig.budget=1.5"),
        ({"truncation": 8, "r_max": 64}, "RankConfig.truncation=8"),
        ({"gap_metric": ""}, "RankConfig.gap_metric"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            RankConfig(**kwargs)
    assert RankConfig(alpha_prior=[2, 1]).alpha_prior == (2, 1)  # YAML lists become tuples
    with pytest.raises(ValueError, match="did you mean 'burn_in'"):
        RankConfig.from_dict({"burnin": 10})
    assert RankConfig.from_dict(RankConfig(seed=3).to_dict()) == RankConfig(seed=3)


def test_allocate_from_config():
    names = [f"m{i}" for i in range(6)]
    cfg = RankConfig(budget=256 * 6 * 4, r_min=1, r_max=16, n_chains=2, n_sweeps=40, burn_in=20,
                     seed=8)
    alloc = allocate_from_config(dict(zip(names, [1, 1, 2, 2, 3, 3])), {n: 256 for n in names}, cfg)
    assert abs(alloc.trainable - cfg.budget) <= 256
    assert alloc.r_min == 1 and alloc.r_max == 16


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("gaps, costs, budget, r_min, r_max, message", [
    ({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 39, 2, 8, "below the smallest feasible rank map"),
    ({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 170, 2, 8, "above the largest feasible rank map"),
    ({"a": 1.0}, {"a": 10}, 50, 6, 4, "r_min=6 > r_max=4"),
    ({}, {}, 50, 0, 4, "gaps is empty"),
    ({"a": 1.0, "b": 2.0}, {"a": 10}, 50, 0, 4, "costs has no entry for module 'b'"),
    ({"a": 1.0}, {"a": 10, "c": 5}, 50, 0, 4, "gaps has no entry for module 'c'"),
    ({"a": float("nan"), "b": 1.0}, {"a": 10, "b": 10}, 50, 0, 4, "gap of 'a' must be finite and >= 0"),
    ({"a": -0.5, "b": 1.0}, {"a": 10, "b": 10}, 50, 0, 4, "gap of 'a' must be finite and >= 0"),
    ({"a": float("inf")}, {"a": 10}, 50, 0, 4, "gap of 'a' must be finite"),
    ({"a": 0.0, "b": 0.0}, {"a": 10, "b": 10}, 50, 0, 4, "all gaps are zero"),
    ({"a": 1.0}, {"a": 0}, 50, 0, 4, "cost of 'a' must be a positive integer"),
    ({"a": 1.0}, {"a": 10}, 0, 0, 4, "budget must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(gaps, costs, budget, r_min, r_max, message):
    with pytest.raises(ValueError, match=message):
        allocate_ranks(gaps, costs, budget, r_min, r_max, **FAST)
