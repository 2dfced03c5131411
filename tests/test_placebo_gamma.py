"""Placebo rank maps keep the module set and the exact parameter count; gamma's posterior recovers a planted law."""
import numpy as np
import pytest

from rank_estimation.allocate import swin_linear_costs
from rank_estimation.gamma_posterior import conditional_gamma, gamma_posterior
from rank_estimation.placebo import (adapter_params, depth_only_map, proportional_map, shuffled_gap_map,
                                     uniform_map)

COSTS = swin_linear_costs(embed_dim=64, depths=(2, 2, 6, 2), targets="all")  # the fractal body's Linears
BLOCKS = [f"layers.{i}.blocks.{j}" for i, d in enumerate((2, 2, 6, 2)) for j in range(d)]
GAPS = {b: 0.1 + 0.05 * k for k, b in enumerate(BLOCKS)}


def stage2_like_map():
    """A map on every Linear (patch merging included) with ranks growing with the gap, as stage 2 writes."""
    rng = np.random.default_rng(0)
    return {m: int(rng.integers(2, 20)) for m in COSTS}


def test_placebos_keep_module_set_and_exact_parameter_count():
    s2 = stage2_like_map()
    total = adapter_params(s2, COSTS)
    maps = {"uniform": uniform_map(s2, COSTS), "shuffled": shuffled_gap_map(GAPS, s2, COSTS, seed=3),
            "depth": depth_only_map(BLOCKS, s2, COSTS)}
    for name, m in maps.items():
        assert list(m) == list(s2), name                       # same modules, same order
        assert adapter_params(m, COSTS) == total, name          # exactly the same parameter count
        assert all(1 <= r <= 64 for r in m.values()), name
    u = list(maps["uniform"].values())
    assert max(u) - min(u) <= 2  # uniform up to the few units that make the count exact
    d = maps["depth"]
    assert d["layers.0.blocks.0.mlp.fc1"] > d["layers.3.blocks.1.mlp.fc1"]  # ranks fall with depth
    assert maps["shuffled"] != shuffled_gap_map(GAPS, s2, COSTS, seed=4)  # the seed picks the permutation
    assert maps["shuffled"] == shuffled_gap_map(GAPS, s2, COSTS, seed=3)


def test_shuffled_map_carries_the_permuted_gaps():
    s2 = stage2_like_map()
    m = shuffled_gap_map(GAPS, s2, COSTS, seed=1)
    perm = np.random.default_rng(1).permutation(len(BLOCKS))
    # the block that received the largest gap gets the largest fc1 rank within its stage's modules of one shape
    got = {b: m[f"{b}.mlp.fc1"] for b in BLOCKS if b.startswith("layers.2.")}
    gaps_now = {b: GAPS[BLOCKS[k]] for b, k in zip(BLOCKS, perm) if b.startswith("layers.2.")}
    assert max(got, key=got.get) == max(gaps_now, key=gaps_now.get)


def test_proportional_map_rejects_an_impossible_count():
    with pytest.raises(ValueError, match="outside"):
        proportional_map({"a": 1.0}, {"a": 128}, 128 * 65)
    with pytest.raises(ValueError, match="cannot be placed exactly"):
        proportional_map({"a": 1.0, "b": 1.0}, {"a": 256, "b": 256}, 256 * 3 + 128)


def test_planted_gamma_is_recovered_and_intervals_cover():
    rng = np.random.default_rng(0)
    knees = np.array([0, 1, 2, 4, 8, 16, 32, 64, 2, 8, 16, 4], dtype=float)
    covered, p_pos = 0, []
    for _ in range(300):
        d = 0.05 * (1 + knees) ** 0.5 * np.exp(rng.normal(0, 0.3, knees.size))
        post = gamma_posterior([d], [knees], level=0.9)
        covered += post["lo"] <= 0.5 <= post["hi"]
        p_pos.append(post["p_positive"])
    assert 0.85 <= covered / 300 <= 0.95  # exact t intervals: 90% coverage of the planted gamma
    assert np.median(p_pos) > 0.99
    d = 0.05 * (1 + knees) ** 0.5
    exact = conditional_gamma(d * np.exp(1e-9 * np.arange(knees.size)), knees)
    assert exact["loc"] == pytest.approx(0.5, abs=1e-6) and exact["beta"] == pytest.approx(0.05, rel=1e-6)


def test_no_relation_gives_p_near_a_half_and_mixture_widens():
    rng = np.random.default_rng(1)
    knees = np.array([0, 1, 2, 4, 8, 16, 32, 64], dtype=float)
    ps = [gamma_posterior([np.exp(rng.normal(0, 1, 8))], [knees])["p_positive"] for _ in range(200)]
    assert 0.4 < np.mean(ps) < 0.6
    base = np.exp(rng.normal(0, 0.2, 8)) * (1 + knees) ** 0.3
    one = gamma_posterior([base], [knees])
    many = gamma_posterior([base * np.exp(rng.normal(0, 0.3, 8)) for _ in range(20)], [knees] * 20)
    assert many["hi"] - many["lo"] > one["hi"] - one["lo"]


@pytest.mark.parametrize("gaps, knees, message", [
    ([1, 2], [0, 1], ">= 3 tasks"),
    ([1, 2, 3], [4, 4, 4], "same knee"),
    ([1, 0, 3], [0, 1, 2], "> 0"),
])
def test_gamma_posterior_bad_input(gaps, knees, message):
    with pytest.raises(ValueError, match=message):
        gamma_posterior([gaps], [knees])
