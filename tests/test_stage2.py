"""Stage 2 (rank_estimation.stage): monotone gaps and ranks on a constructed model, the tiny end-to-end run
whose rank map stage 3 loads, bad inputs, and the benchmark script's CPU smoke test."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from orca.config import load_config as load_core_config
from orca.model import ORCAModel
from orca.schema import ConfigError
from rank_estimation.allocate import allocate_ranks, costs_from_model, expand
from rank_estimation.config import Stage2Config
from rank_estimation.features import EMBED, capture_block_features
from rank_estimation.gaps import gap_profile

REPO = Path(__file__).resolve().parents[1]
#: Stage 2 reads the ``rank`` section, which orca core's schema does not hold.
load_config = functools.partial(load_core_config, schema=Stage2Config)
FAST_RANK = ["rank.n_chains=2", "rank.n_sweeps=40", "rank.burn_in=20"]


# ----------------------------------------------------------------------------- constructed model
class Stream:
    """Which stream is running: the stand-in embedders set it, the blocks read it."""

    target = False


class Patchify(nn.Module):
    """A fixed 2x2 patch embedding to NHWC tokens; ``is_target`` marks the stream it starts."""

    def __init__(self, weight: torch.Tensor, stream: Stream, is_target: bool):
        super().__init__()
        self.weight, self.stream, self.is_target = nn.Parameter(weight.clone()), stream, is_target

    def forward(self, x):
        self.stream.target = self.is_target
        return nn.functional.conv2d(x, self.weight, stride=2).permute(0, 2, 3, 1)


class DistortingBlock(nn.Module):
    """A Swin-shaped block (attn.qkv/proj, mlp.fc1/fc2 with zero output weights, so the base path is the
    identity) that shifts target tokens along a fixed direction by ``shift``; source tokens pass unchanged."""

    def __init__(self, dim: int, shift: float, direction: torch.Tensor, stream: Stream):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        for lin in (self.attn.proj, self.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.shift, self.stream = shift, stream
        self.register_buffer("direction", direction)

    def forward(self, x):
        dim = x.shape[-1]
        x = x + self.attn.proj(self.attn.qkv(x)[..., :dim]) + self.mlp.fc2(self.mlp.fc1(x))
        return x + self.shift * self.direction if self.stream.target else x


class StandInBody(nn.Module):
    """``layers[i].blocks[j]`` of distorting blocks; block k (in forward order) adds a shift 0.15 (k + 1)."""

    def __init__(self, dim: int, depths, stream: Stream):
        super().__init__()
        direction = torch.randn(dim, generator=torch.Generator().manual_seed(3))
        direction = direction / direction.norm() * dim ** 0.5 / 4  # source rows have RMS spread ~ sqrt(dim) / 4
        self.layers, k = nn.ModuleList(), 0
        for depth in depths:
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(depth):
                k += 1
                stage.blocks.append(DistortingBlock(dim, 0.15 * k, direction, stream))
            self.layers.append(stage)

    def forward_features(self, x):
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
        return x


def test_growing_target_distortion_gives_non_decreasing_gaps_and_ranks():
    torch.manual_seed(0)
    dim, stream = 16, Stream()
    weight = torch.randn(dim, 3, 2, 2) / 2
    body = StandInBody(dim, depths=[2, 3, 1], stream=stream)
    model = ORCAModel(Patchify(weight, stream, is_target=True), body, nn.Identity())
    source = Patchify(weight, stream, is_target=False)
    gen = torch.Generator().manual_seed(1)
    x_src, x_tgt = torch.randn(300, 3, 8, 8, generator=gen), torch.randn(300, 3, 8, 8, generator=gen)
    src = capture_block_features(model, x_src, embedder=source, batch_size=64)
    tgt = capture_block_features(model, x_tgt, batch_size=64)
    blocks = [n for n in src if n != EMBED]
    assert len(blocks) == 6

    metrics = ["mmd", "sliced_wasserstein", "sinkhorn", "pad"]
    profile = gap_profile(src, tgt, metrics, n_boot=0, seed=0)
    for m in metrics:
        d = [profile["values"][b][m]["value"] for b in [EMBED, *blocks]]
        assert all(b >= a for a, b in zip(d, d[1:])), f"{m} is not non-decreasing over the layers: {d}"
        if m != "pad":  # pad saturates at 2 once the domains separate; the others keep growing
            assert d[-1] > 2 * d[1] and d[1] > d[0], f"{m} does not grow with the distortion: {d}"

    d_block = {b: profile["values"][b]["mmd"]["value"] for b in blocks}
    costs = costs_from_model(body, "all")
    assert len(costs) == 4 * 6 and len(set(costs[n] for n in costs if n.endswith("qkv"))) == 1
    alloc = allocate_ranks(expand(d_block, list(costs)), costs, budget=4 * sum(costs.values()),  # mean rank 4
                           r_min=1, r_max=32, n_chains=2, n_sweeps=80, burn_in=40, seed=0)
    for kind in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        ranks = [alloc.rank_map[f"{b}.{kind}"] for b in blocks]
        assert all(b >= a for a, b in zip(ranks, ranks[1:])), f"{kind} ranks decrease with depth: {ranks}"
        assert ranks[-1] > ranks[0], f"{kind} ranks do not follow the gap: {ranks}"
    assert abs(alloc.trainable - alloc.budget) <= alloc.tolerance


# ----------------------------------------------------------------------------- end to end
def _stage2_overrides(tiny_overrides, *extra):
    return [*tiny_overrides, "align.source=fractal", "align.n_clusters=3", "rank.n_source=40", "rank.n_boot=3",
            "rank.budget=20000", "rank.r_max=16", *FAST_RANK, *extra]


def test_stage2_rank_map_loads_into_stage3(tiny_overrides):
    from orca.train import run_stage3
    from rank_estimation.allocate import RankAllocation
    from rank_estimation.stage import run_stage2

    run = run_stage2(load_config(None, _stage2_overrides(tiny_overrides)))
    for name in ("rank_map.json", "gaps.json", "gaps.png", "ranks.png", "config.yaml", "summary.json"):
        assert (run.path / name).is_file(), name
    data = json.loads((run.path / "rank_map.json").read_text())
    blocks = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0", "layers.3.blocks.0"]
    assert data["gap_profile"]["layers"] == blocks and data["gap_metric"] == "mmd"
    assert data["budget"] == 20000 and abs(data["trainable"] - 20000) <= data["tolerance"]
    assert data["trainable"] == sum(data["costs"][n] * r for n, r in data["rank_map"].items())
    assert set(data["prior"]) >= {"alpha_prior", "beta", "gamma", "sigma", "truncation"}
    assert len(data["rank_map"]) == 4 * 4 + 3 and set(data["intervals"]) == set(data["rank_map"])
    assert RankAllocation.from_json(run.path / "rank_map.json").rank_map == data["rank_map"]
    gaps = json.loads((run.path / "gaps.json").read_text())
    assert gaps["layers"] == [EMBED, *blocks]
    assert set(gaps["metrics"]) == {"mmd", "sliced_wasserstein", "sinkhorn", "otdd", "pad"}
    for layer in gaps["layers"]:
        for v in gaps["values"][layer].values():
            assert np.isfinite([v["value"], v["lo"], v["hi"]]).all()
    summary = json.loads((run.path / "summary.json").read_text())
    assert set(summary["seconds_per_metric"]) == set(gaps["metrics"]) and summary["git"]["commit"]

    cfg3 = load_config(None, [*tiny_overrides, "adapter.method=lora", f"adapter.rank_map={run.path / 'rank_map.json'}",
                              "train.epochs=1", "train.warmup_epochs=0", "train.max_steps_per_epoch=1"])
    run3 = run_stage3(cfg3)
    state = torch.load(run3.path / "ckpt" / "last.pt", map_location="cpu", weights_only=True)["model"]
    injected = {k[len("body."):-len(".lora_A")]: int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A")}
    assert injected == data["rank_map"]
    params = json.loads((run3.path / "summary.json").read_text())["params"]
    assert params["adapters"] == data["trainable"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, error, message", [
    (["rank.budget=100"], ValueError, "budget 100 is below the smallest feasible rank map: r_min=1 on all 19 modules"),
    (["rank.budget=100000000"], ValueError, "is above the largest feasible rank map: r_max=16"),
    (["rank.n_target=25"], ValueError, "rank.n_target=25 exceeds the 24 training samples"),
    (["rank.metric_kwargs={sinkhorn: {blur: 0.1}}", "rank.metrics=[mmd]"], ValueError,
     "rank.metric_kwargs has options for metrics that are not measured: ['sinkhorn']"),
])
def test_stage2_bad_settings_fail_before_measuring(tiny_overrides, extra, error, message):
    from rank_estimation.stage import run_stage2

    cfg = load_config(None, _stage2_overrides(tiny_overrides, *extra))
    with pytest.raises(error) as err:
        run_stage2(cfg)
    assert message in str(err.value)
    assert not (Path(cfg.output_dir)).exists() or not any(Path(cfg.output_dir).glob("stage2__*/gaps.json"))


@pytest.mark.parametrize("extra, message", [
    (["rank.r_min=5", "rank.r_max=3"], "RankConfig.r_max=3 is not allowed; expected an integer >= max(r_min=5, 1)"),
    (["rank.pool=max"], "RankConfig.pool='max' is not allowed"),
    (["rank.n_source=0"], "RankConfig.n_source=0"),
    (["rank.n_target=1"], "RankConfig.n_target=1"),
    (["rank.metrics=[mmd, mmd]"], "without repeated names"),
    (["rank.ci_level=1.5"], "RankConfig.ci_level=1.5"),
    (["rank.metrics=[mmd]", "rank.boot_metrics=[pad]"], "RankConfig.boot_metrics=('pad',) is not allowed"),
    # metric names are checked against the gap-metric registry when the config loads
    (["rank.metrics=[mmd, sliced_wasserstien]"], "rank.metrics: unknown gap metric 'sliced_wasserstien'; did you mean"),
    (["rank.gap_metric=mdd"], "rank.gap_metric: unknown gap metric 'mdd'; did you mean 'mmd'"),
])
def test_bad_rank_config(tiny_overrides, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, _stage2_overrides(tiny_overrides, *extra))
    assert message in str(err.value)


def test_target_sample_spans_a_class_ordered_set():
    """n_target < n_train draws across the whole set by the seed; None or all keeps every item."""
    from rank_estimation.stage import target_positions

    labels = [i // 50 for i in range(5000)]  # 100 classes of 50, in class order (the fractal tasks)
    pos = target_positions(5000, 1000, seed=0)
    assert len(pos) == len(set(pos)) == 1000 and pos == sorted(pos)
    assert len({labels[i] for i in pos}) == 100  # the first 1,000 would hold 20 classes
    assert pos == target_positions(5000, 1000, seed=0) != target_positions(5000, 1000, seed=1)
    assert target_positions(1000, 1000, seed=3) == target_positions(1000, None, seed=3) == list(range(1000))
    with pytest.raises(ValueError, match="rank.n_target=1001 exceeds the 1000 training samples"):
        target_positions(1000, 1001, seed=0)


def test_unresolved_gaps_and_empty_targets_are_refused():
    from rank_estimation.allocate import check_budget
    from rank_estimation.stage import block_gaps, target_positions

    profile = {"values": {"a": {"mmd": {"value": -0.01}}, "b": {"mmd": {"value": 0.0}}}}
    with pytest.raises(ValueError, match="gap metric 'mmd' is <= 0 at every block"):
        block_gaps(profile, "mmd", ["a", "b"])
    profile["values"]["b"]["mmd"]["value"] = 0.2
    assert block_gaps(profile, "mmd", ["a", "b"]) == ({"a": 0.0, "b": 0.2}, ["a"])
    with pytest.raises(ValueError, match="the target task has 0 training samples"):
        target_positions(0, None, 0)
    with pytest.raises(ValueError, match="r_min=4 > r_max=2"):
        check_budget({"a": 10}, 30, 4, 2)
    with pytest.raises(ValueError, match="costs is empty"):
        check_budget({}, 30, 1, 2)
    with pytest.raises(ValueError, match="source_feats is empty"):
        gap_profile({}, {}, ["mmd"])


# ----------------------------------------------------------------------------- reusing a gap profile
REUSE_MEASURE = ["rank.metrics=[mmd, sinkhorn]", "rank.n_boot=2"]


@pytest.fixture(scope="module")
def _measured_runs():
    return {}


@pytest.fixture
def measured_stage2(_measured_runs, tiny_overrides):
    """The directory of a finished stage-2 run (mmd and sinkhorn with intervals), measured once per module.

    Later tests get the first test's run: its profile fits every tiny config, whose tmp paths do not enter the
    provenance."""
    if "path" not in _measured_runs:
        from rank_estimation.stage import run_stage2

        _measured_runs["path"] = run_stage2(load_config(None, _stage2_overrides(tiny_overrides, *REUSE_MEASURE))).path
    return _measured_runs["path"]


def test_stage2_gaps_from_allocates_a_measured_profile_at_another_budget(tiny_overrides, measured_stage2,
                                                                         monkeypatch):
    import rank_estimation.stage as stage

    def refuse(*args, **kwargs):
        raise AssertionError("a gaps_from run must not build task data or capture features")

    monkeypatch.setattr(stage, "capture_block_features", refuse)
    monkeypatch.setattr(stage, "build_task", refuse)
    first = json.loads((measured_stage2 / "rank_map.json").read_text())
    run = stage.run_stage2(load_config(None, _stage2_overrides(tiny_overrides, "rank.budget=40000",
                                                               f"rank.gaps_from={measured_stage2}")))
    for name in ("rank_map.json", "gaps.json", "gaps.png", "ranks.png", "config.yaml", "summary.json"):
        assert (run.path / name).is_file(), name
    data = json.loads((run.path / "rank_map.json").read_text())
    assert data["gap_profile"] == first["gap_profile"]
    assert data["budget"] == 40000 and abs(data["trainable"] - 40000) <= data["tolerance"]
    assert data["trainable"] == sum(data["costs"][n] * r for n, r in data["rank_map"].items())
    assert first["budget"] == 20000 and sum(data["rank_map"].values()) > sum(first["rank_map"].values())
    assert data["provenance"] == {**first["provenance"], "gaps_from": str(measured_stage2)}
    gaps, measured = (json.loads((d / "gaps.json").read_text()) for d in (run.path, measured_stage2))
    assert gaps == {**measured, "provenance": data["provenance"]}
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["gaps_from"] == str(measured_stage2) and summary["metrics"] == ["mmd", "sinkhorn"]
    assert {k: summary["timing_s"][k] for k in ("data_s", "capture_s", "gaps_s")} == dict.fromkeys(
        ("data_s", "capture_s", "gaps_s"))
    assert summary["budget"] == 40000 and summary["n_target"] == 24

    # the profile's other metric can become D; gaps.json then names it as the chosen one
    other = stage.run_stage2(load_config(None, _stage2_overrides(tiny_overrides, "rank.gap_metric=sinkhorn",
                                                                 f"rank.gaps_from={measured_stage2}")))
    data = json.loads((other.path / "rank_map.json").read_text())
    assert data["gap_metric"] == "sinkhorn" and abs(data["trainable"] - 20000) <= data["tolerance"]
    assert data["gap_profile"]["value"] == [measured["values"][b]["sinkhorn"]["value"]
                                            for b in data["gap_profile"]["layers"]]
    assert json.loads((other.path / "gaps.json").read_text())["chosen"] == "sinkhorn"


@pytest.mark.parametrize("where, provenance, extra, error, message", [
    ("missing", None, [], ConfigError, "no such directory"),
    ("empty", None, [], ConfigError, "no gaps.json there"),
    ("edited", {"task": "cifar10"}, [], ValueError, "measured on another setup (task 'cifar10' there, 'darcy' here)"),
    ("measured", None, ["model.body=swin_small_patch4_window7_224"], ValueError,
     "(body 'swin_tiny_patch4_window7_224' there, 'swin_small_patch4_window7_224' here)"),
    ("edited", {"weights": "hub:swin_tiny_patch4_window7_224.ms_in22k"}, [], ValueError,
     "(weights 'hub:swin_tiny_patch4_window7_224.ms_in22k' there, 'none (random init)' here)"),
    ("measured", None, ["model.embedder_init=random"], ValueError,
     "(target_embedder 'initial (model.embedder_init=pretrained)' there, 'initial (model.embedder_init=random)' here)"),
    ("measured", None, ["rank.gap_metric=pad"], ValueError,
     "rank.gap_metric='pad' was not measured there; that profile has ['mmd', 'sinkhorn']"),
])
def test_stage2_gaps_from_bad_inputs_fail_before_writing(tiny_overrides, measured_stage2, tmp_path, where, provenance,
                                                        extra, error, message):
    import shutil

    from rank_estimation.stage import run_stage2

    source = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "measured": measured_stage2,
              "edited": tmp_path / "edited"}[where]
    if where == "empty":
        source.mkdir()
    if provenance is not None:
        shutil.copytree(measured_stage2, source)
        gaps = json.loads((source / "gaps.json").read_text())
        gaps["provenance"].update(provenance)
        (source / "gaps.json").write_text(json.dumps(gaps))
    cfg = load_config(None, _stage2_overrides(tiny_overrides, f"rank.gaps_from={source}", *extra))
    runs = Path(cfg.output_dir)
    before = sorted(runs.iterdir()) if runs.exists() else []
    with pytest.raises(error) as err:
        run_stage2(cfg)
    assert str(err.value).startswith(f"rank.gaps_from={str(source)!r}: ") and message in str(err.value)
    assert (sorted(runs.iterdir()) if runs.exists() else []) == before


def test_a_profile_unresolved_at_every_block_is_measured_without_a_rank_map(tiny_overrides, measured_stage2,
                                                                           monkeypatch, capsys):
    """A task at the source distribution itself (a gap dial's level 0): the gap is <= 0 at every
    block. The allocation refuses it and the measured values are lost; ``rank.allocate=false``
    keeps the profile (the measurement) as a finished run without a rank map."""
    import rank_estimation.stage as stage

    measured = json.loads((measured_stage2 / "gaps.json").read_text())
    source_like = json.loads(json.dumps(measured))
    for layer in source_like["values"].values():
        layer["mmd"]["value"] = -abs(layer["mmd"]["value"]) * 1e-3
    monkeypatch.setattr(stage, "measure_gaps", lambda *args: (json.loads(json.dumps(source_like)),
                                                              {"data_s": 0.0, "capture_s": 0.0, "gaps_s": 0.0}))
    refused = measured_stage2.parent / "refused"
    with pytest.raises(ConfigError, match="gap metric 'mmd' is <= 0 at every block"):
        stage.run_stage2(load_config(None, _stage2_overrides(tiny_overrides, f"run_dir={refused}")))
    assert json.loads((refused / "summary.json").read_text())["status"] == "failed"
    assert not (refused / "gaps.json").exists()

    capsys.readouterr()
    run = stage.run_stage2(load_config(None, _stage2_overrides(tiny_overrides, "rank.allocate=false")))
    hint = f"rank.allocate=true rank.gaps_from={run.path}"  # the printed next step overrides the profile's config
    assert hint in capsys.readouterr().out
    assert load_config(None, _stage2_overrides(tiny_overrides, "rank.allocate=false", *hint.split())).rank.allocate
    assert sorted(p.name for p in run.path.iterdir() if p.is_file()) == ["config.yaml", "gaps.json", "gaps.png",
                                                                         "summary.json"]
    summary = json.loads((run.path / "summary.json").read_text())
    blocks = [layer for layer in measured["layers"] if layer != "embed"]
    assert summary["status"] == "finished" and summary["rank_map"] is None and "budget" not in summary
    assert summary["unresolved_blocks"] == blocks and summary["metrics"] == ["mmd", "sinkhorn"]
    assert json.loads((run.path / "gaps.json").read_text()) == {**source_like, "chosen": "mmd"}
    with pytest.raises(ValueError, match="RankConfig.allocate=False is not allowed; expected true with gaps_from"):
        load_config(None, _stage2_overrides(tiny_overrides, "rank.allocate=false", f"rank.gaps_from={run.path}"))


def test_gaps_from_must_be_a_directory_name(tiny_overrides):
    with pytest.raises(ConfigError, match="RankConfig.gaps_from=''"):
        load_config(None, _stage2_overrides(tiny_overrides, "rank.gaps_from=''"))


# ----------------------------------------------------------------------------- benchmark script
def test_bench_stage2_cpu_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "bench_stage2.py"), "--device", "cpu", "--n", "24",
           "--body", "swin_tiny_patch4_window7_224", "--img-size", "32", "--target-size", "12",
           "--body-kwargs", json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                                        "window_size": 2}), "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((tmp_path / "stage2.json").read_text())
    assert rec["settings"]["blocks"] == 4 and rec["settings"]["n_source"] == 24
    assert set(rec["seconds_per_metric"]) == {"mmd", "mmd_source", "otdd", "pad", "sinkhorn", "sliced_w2_source", "sliced_wasserstein"}
    assert rec["git"]["commit"] and "bench_stage2.py" in rec["command"] and rec["machine"]["cpus"]
    assert "| **all** |" in (tmp_path / "stage2.md").read_text()


def test_stage1_embedder_lowers_the_embedding_gap(tiny_overrides):
    """Stage 2 reads stage 1's embedder (model.embedder_from) and uses the source set stage 1 aligned to:
    the aligned embedder must be closer to the source at the embedding than the initial one."""
    from orca.align.loop import run_stage1
    from rank_estimation.stage import run_stage2

    common = _stage2_overrides(tiny_overrides, "align.n_source=40", "rank.n_boot=0", "rank.metrics=[otdd]")
    stage1 = run_stage1(load_config(None, [*common, "align.epochs=3"]))
    before = run_stage2(load_config(None, common))
    after = run_stage2(load_config(None, [*common, f"model.embedder_from={stage1.path}"]))
    gap = {k: json.loads((r.path / "gaps.json").read_text())["values"][EMBED]["otdd"]["value"]
           for k, r in (("before", before), ("after", after))}
    assert gap["after"] < 0.8 * gap["before"], gap


def test_token_rows_and_stage3_coverage_warning(tiny_overrides):
    """pool=tokens keeps tokens_per_sample rows per image (fewer where a block has fewer tokens), otdd labels
    follow their image; a rank map that does not cover stage 3's adapter.targets is flagged."""
    from rank_estimation.stage import run_stage2

    cfg = load_config(None, _stage2_overrides(tiny_overrides, "rank.pool=tokens", "rank.tokens_per_sample=4",
                                              "rank.n_boot=2", "rank.boot_metrics=[mmd]", "rank.targets=attn",
                                              "adapter.targets=all"))
    with pytest.warns(RuntimeWarning, match="would get the uniform adapter.rank"):
        run = run_stage2(cfg)
    gaps = json.loads((run.path / "gaps.json").read_text())
    tokens = {EMBED: 64, "layers.0.blocks.0": 64, "layers.1.blocks.0": 16, "layers.2.blocks.0": 4,
              "layers.3.blocks.0": 1}  # 32 px / patch 4 = 8x8, halved per stage
    assert gaps["rows"] == {k: {"source": 40 * min(4, t), "target": 24 * min(4, t)} for k, t in tokens.items()}
    assert gaps["settings"]["n_source"] == 40 and gaps["settings"]["n_target"] == 24
    for layer in tokens:  # intervals only where asked for
        otdd, mmd = gaps["values"][layer]["otdd"], gaps["values"][layer]["mmd"]
        assert otdd["lo"] == otdd["value"] == otdd["hi"] and mmd["lo"] < mmd["hi"]
    assert list(gaps["values"][EMBED]) == gaps["metrics"]
    data = json.loads((run.path / "rank_map.json").read_text())
    assert all(k.endswith(("attn.qkv", "attn.proj")) for k in data["rank_map"])
    assert data["stage3"]["uncovered_by_adapter_targets"][0] == "layers.0.blocks.0.mlp.fc1"


@pytest.mark.parametrize("extra, message", [
    (["rank.gaps_from={nowhere}"], "error: rank.gaps_from="),
    (["rank.metrics=[mmd,nonsense]"], "error: rank.metrics"),
])
def test_stage2_mistakes_end_in_one_error_line(tiny_overrides, tmp_path, capsys, extra, message):
    """A stage-2 key pointing at nothing, or an unknown metric, is a config error: one line, exit 2."""
    from orca.cli import main
    from orca.errors import exit_on_error

    overrides = _stage2_overrides(tiny_overrides, *(e.format(nowhere=tmp_path / "nowhere") for e in extra))
    assert exit_on_error(main, ["stage2", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
