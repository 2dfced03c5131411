"""Stage 2: per-block modality gaps D_1..D_L -> IBP rank posterior P(r | D) -> a budgeted LoRA rank map.

Why this file is long: it is stage 2 read top to bottom, the five steps below, each a
function; the measurements themselves live in rank_estimation.features, gaps and allocate.

    python -m orca stage2 --config configs/darcy_tiny.yaml align.source=fractal
    bash scripts/stage2.sh configs/darcy_swinb.yaml model.embedder_from=runs/stage1__darcy__... \\
        align.source=fractal rank.budget=1600000 rank.gap_metric=mmd
    bash scripts/stage3.sh configs/darcy_swinb.yaml adapter.method=lora \\
        adapter.rank_map=runs/stage2__darcy__.../rank_map.json            # stage 3 reads the map

What it does, top to bottom:
1. Cheap checks first (metric names, sample counts, budget feasibility on the body's Linear costs),
   so a bad setting fails in seconds rather than after the feature capture.
2. Source stream: ``rank.n_source`` labelled source images (``rank.source``, default the set stage 1
   aligned to: ``align.source``) through the body's pretrained patch embedding, then the body.
   Target stream: ``rank.n_target`` target training inputs (a seeded uniform sample) through the model's embedder
   (stage 1's when ``model.embedder_from`` is set, else the initial one), then the same body.
   Features are hooked at the embedder and every block (``rank_estimation.features``).
3. Every metric of ``rank.metrics`` at every layer with bootstrap intervals
   (``rank_estimation.gaps``); otdd labels the target with k-means clusters for regression tasks,
   exactly as stage 1 does (``align.n_clusters``).
4. D_i = ``rank.gap_metric`` at block i, expanded onto the block's Linear modules, allocated under
   ``rank.budget`` (``rank_estimation.allocate``).
5. ``rank_map.json`` (stage 3's ``adapter.rank_map``), ``gaps.json``, ``gaps.png``, ``ranks.png``,
   ``config.yaml``, ``summary.json`` in the run directory.

Reusing a gap profile: the measurement (steps 2-3) is the slow part, the allocation (4-5) takes
seconds, and experiments want rank maps of one profile at several budgets. ``rank.gaps_from=DIR``
reads ``DIR/gaps.json`` instead of measuring: no task data, no feature capture, only the budget
check, the allocation at this run's ``rank.budget`` / prior, and the same outputs, which record
``gaps_from`` (``summary.json``, and the provenance in ``gaps.json`` / ``rank_map.json``). The
profile must come from the same task, body, weights and target embedder, and hold
``rank.gap_metric``; otherwise the run stops, naming the difference, before writing anything::

    bash scripts/stage2.sh configs/body_fractal.yaml task.name=darcy rank.budget=1177600 \\
        rank.gaps_from=results/runs/adaptive_darcy/stage2_b282624 \\
        run_dir=results/runs/adaptive_darcy/stage2_b1177600

Why the body is seeded before each build: with ``model.weights=none`` the source patch embedding
and the body are random draws, and they must be the same draw (as in stage 1) or the source stream
would run through a patch embedding that does not belong to the body.
"""
from __future__ import annotations

import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from datasets.images import source_feature_set
from datasets.progress import progress
from datasets.registry import build_task
from orca.config import config_yaml
from orca.errors import reading
from orca.schema import ConfigError
from orca.model import body_from_config, build_model, source_embedder
from orca.provenance import check_embedder_from, next_command, same_origin, target_embedder
from orca.runs import RunDir, git_info, machine_info, save_png, write_json
from orca.runtime import fetch_inputs, resolve_device, seed_everything, target_labels
from rank_estimation.allocate import RankAllocation, allocate_from_config, check_budget, costs_from_model, expand
from rank_estimation.config import Stage2Config
from rank_estimation.features import EMBED, capture_block_features, layer_names
from rank_estimation.gaps import gap_profile

RANK_MAP_FILE = "rank_map.json"


# ----------------------------------------------------------------------------- checks
def stage2_metrics(rank_cfg) -> List[str]:
    """The metrics to measure: ``rank.metrics`` plus ``rank.gap_metric`` (each a registered metric: RankConfig checks)."""
    metrics = list(rank_cfg.metrics)
    if rank_cfg.gap_metric not in metrics:
        metrics.append(rank_cfg.gap_metric)
    extra = sorted(set(rank_cfg.metric_kwargs) - set(metrics))
    if extra:
        raise ConfigError(f"rank.metric_kwargs has options for metrics that are not measured: {extra} "
                         f"(measured: {metrics})")
    return metrics


def target_positions(n_train: int, n_target: Optional[int], seed: int) -> List[int]:
    """``n_target`` training items drawn uniformly without replacement by ``seed``, in index order
    (all when None or when it is the whole set).

    Why not the first ``n_target``: class-ordered sets (the fractal tasks, natural patches) would
    then show stage 2 only their first classes, and the gap would describe a narrower distribution
    than the one training sees."""
    if n_train < 2:
        raise ConfigError(f"the target task has {n_train} training samples; a gap needs at least 2")
    if n_target is not None and n_target > n_train:
        raise ConfigError(f"rank.n_target={n_target} exceeds the {n_train} training samples of the target task; "
                         f"lower it or set it to null (all)")
    if n_target is None or n_target == n_train:
        return list(range(n_train))
    drawn = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n_target]
    return sorted(drawn.tolist())


def block_gaps(profile: Mapping[str, Any], metric: str, blocks: List[str]) -> Tuple[Dict[str, float], List[str]]:
    """D_i per block from a gap profile; negative estimates are clipped to 0.

    Why clip: unbiased MMD^2 and PAD are negative when the two samples are closer than sampling
    noise, i.e. the gap is unresolved; the allocator needs D_i >= 0 (a 0 is floored three decades
    below the smallest positive gap, so such a block gets the fewest ranks).

    Returns:
        ``(block -> D_i, names of the clipped blocks)``.
    """
    raw = {b: float(profile["values"][b][metric]["value"]) for b in blocks}
    clipped = [b for b, v in raw.items() if v < 0]
    gaps = {b: max(v, 0.0) for b, v in raw.items()}
    if not any(v > 0 for v in gaps.values()):
        raise ConfigError(f"gap metric {metric!r} is <= 0 at every block ({', '.join(f'{v:.3g}' for v in raw.values())}): "
                         f"the target stream is indistinguishable from the source at this sample size, so the gaps "
                         f"carry no rank information; raise rank.n_source / rank.n_target, try another "
                         f"rank.gap_metric, or use a uniform adapter.rank")
    return gaps, clipped


def stage3_coverage(body: torch.nn.Module, adapter_cfg, rank_map: Mapping[str, int]) -> List[str]:
    """Linears that stage 3's ``adapter.targets`` adapts but the rank map does not name.

    Stage 3 gives them the uniform ``adapter.rank``, which spends parameters outside the budget.
    """
    linears = [n for n, m in body.named_modules() if isinstance(m, torch.nn.Linear) and n]
    patterns = adapter_cfg.target_patterns()
    return [n for n in linears if n not in rank_map and any(re.fullmatch(p, n) for p in patterns)]


# ----------------------------------------------------------------------------- measuring
def _row_labels(labels: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """Per-image labels repeated onto a layer's rows (token rows inherit the label of their image)."""
    if labels is None or rows == labels.shape[0]:
        return labels
    return labels.repeat_interleave(rows // labels.shape[0])


def measure_profile(src: Dict[str, torch.Tensor], tgt: Dict[str, torch.Tensor], metrics: List[str], rank_cfg,
                    seed: int, device: torch.device, source_labels: Optional[torch.Tensor] = None,
                    target_labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """:func:`rank_estimation.gaps.gap_profile` one layer at a time (a progress bar), merged into one dict.

    Args:
        src, tgt: layer -> ``[rows, d]`` features of the two streams.
        metrics: registered gap metrics.
        rank_cfg: the RankConfig (n_boot, boot_metrics, ci_level, standardize, metric_kwargs).
        seed: bootstrap seed.
        device: where the metrics run.
        source_labels, target_labels: per-image labels ``[m]`` / ``[n]`` (for otdd), or None.
    """
    merged: Dict[str, Any] = {"layers": [], "metrics": metrics, "values": {}, "scale": {}, "rows": {},
                              "seconds": {m: 0.0 for m in metrics}}
    boot = [m for m in metrics if rank_cfg.boot_metrics is None or m in rank_cfg.boot_metrics]
    groups = [(ms, n) for ms, n in ((boot, rank_cfg.n_boot), ([m for m in metrics if m not in boot], 0)) if ms]
    for layer in progress(list(src), desc="stage2 gaps", unit="layer"):
        merged["layers"].append(layer)
        merged["values"][layer] = {}
        for names, n_boot in groups:
            kwargs = {m: dict(rank_cfg.metric_kwargs[m]) for m in names if m in rank_cfg.metric_kwargs}
            part = gap_profile({layer: src[layer]}, {layer: tgt[layer]}, names, n_boot=n_boot,
                               alpha=round(1.0 - rank_cfg.ci_level, 12), seed=seed,
                               source_labels=_row_labels(source_labels, src[layer].shape[0]),
                               target_labels=_row_labels(target_labels, tgt[layer].shape[0]),
                               metric_kwargs=kwargs or None, standardize=rank_cfg.standardize, device=device)
            merged["values"][layer].update(part["values"][layer])
            merged["scale"][layer] = part["scale"][layer]
            for m, s in part["seconds"].items():
                merged["seconds"][m] += s
            merged["settings"] = {**part["settings"], "n_boot": rank_cfg.n_boot, "boot_metrics": boot,
                                  "metric_kwargs": dict(rank_cfg.metric_kwargs)}
        merged["values"][layer] = {m: merged["values"][layer][m] for m in metrics}
        merged["rows"][layer] = {"source": int(src[layer].shape[0]), "target": int(tgt[layer].shape[0])}
    return merged


# ----------------------------------------------------------------------------- plots
def _short(layer: str) -> str:
    return "emb" if layer == EMBED else ".".join(layer.split(".")[1::2])  # layers.2.blocks.5 -> 2.5


def plot_gaps(profile: Mapping[str, Any], chosen: str, path) -> None:
    """One panel per metric: value and bootstrap interval at every layer (``gaps.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, metrics = profile["layers"], profile["metrics"]
    x = list(range(len(layers)))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.32 * len(layers)), 1.9 * len(metrics) + 0.6),
                             dpi=120, sharex=True, squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        val = [profile["values"][layer][m]["value"] for layer in layers]
        lo = [profile["values"][layer][m]["lo"] for layer in layers]
        hi = [profile["values"][layer][m]["hi"] for layer in layers]
        color = "C3" if m == chosen else "C0"
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(x, val, marker="o", markersize=3, color=color)
        ax.set_ylabel(m + (" (D)" if m == chosen else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels([_short(layer) for layer in layers], rotation=90, fontsize=7)
    axes[-1, 0].set_xlabel("layer (stage.block)")
    s = profile["settings"]
    boot = s.get("boot_metrics", metrics)
    which = "" if set(boot) == set(metrics) else f" for {', '.join(boot)}"
    fig.suptitle(f"gap per layer: n_source={s['n_source']}, n_target={s['n_target']}, "
                 f"{round(100 * (1 - s['alpha']))}% bootstrap CI{which} (n_boot={s['n_boot']})", fontsize=9)
    save_png(fig, path)


def plot_ranks(alloc: RankAllocation, blocks: List[str], block_d: Mapping[str, Any], metric: str, path) -> None:
    """D_i per block (top) and the allocated rank of every Linear with its credible interval (``ranks.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (integer rank ticks)

    pos = {b: i for i, b in enumerate(blocks)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.32 * len(blocks)), 5.6), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [1, 2]})
    x = list(range(len(blocks)))
    top.fill_between(x, [block_d[b]["lo"] for b in blocks], [block_d[b]["hi"] for b in blocks], alpha=0.2,
                     color="C3", linewidth=0)
    top.plot(x, [block_d[b]["value"] for b in blocks], marker="o", markersize=3, color="C3")
    top.set_ylabel(f"D ({metric})", fontsize=8)
    top.grid(alpha=0.3)
    kinds: Dict[str, Tuple[List[float], List[int], List[Tuple[int, int]]]] = {}
    for name, r in alloc.rank_map.items():
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is not None:
            xi, kind = float(pos[block]), name[len(block) + 1:]
        else:  # patch merging: drawn just before the first block of its stage
            stage = name.split(".")[1]
            first = next(b for b in blocks if b.split(".")[1] == stage)
            xi, kind = pos[first] - 0.5, name.split(".", 2)[2]
        xs, rs, iv = kinds.setdefault(kind, ([], [], []))
        xs.append(xi)
        rs.append(r)
        iv.append(alloc.intervals[name])
    for k, (kind, (xs, rs, iv)) in enumerate(sorted(kinds.items())):
        off = (k - (len(kinds) - 1) / 2) * 0.12
        err = [[r - lo for r, (lo, _) in zip(rs, iv)], [hi - r for r, (_, hi) in zip(rs, iv)]]
        err = [[max(e, 0) for e in side] for side in err]
        bottom.errorbar([v + off for v in xs], rs, yerr=err, fmt="o", markersize=3, capsize=1.5, label=kind,
                        elinewidth=0.7)
    bottom.set_ylabel("rank")
    bottom.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.legend(fontsize=7, ncol=min(len(kinds), 5))
    bottom.grid(alpha=0.3)
    bottom.set_xticks(x)
    bottom.set_xticklabels([_short(b) for b in blocks], rotation=90, fontsize=7)
    bottom.set_xlabel("block (stage.block)")
    fig.suptitle(f"rank map: {alloc.trainable:,} of budget {alloc.budget:,} parameters, "
                 f"ranks in [{alloc.r_min}, {alloc.r_max}], {int(100 * alloc.level)}% credible intervals", fontsize=9)
    save_png(fig, path)


# ----------------------------------------------------------------------------- the stage
#: The keys of a gaps.json that reuse needs (what :func:`measure_gaps` returns, plus ``chosen``).
GAPS_KEYS = ("layers", "metrics", "values", "seconds", "settings", "dims", "provenance")


def body_only(model_cfg) -> torch.nn.Module:
    """The body :func:`orca.model.build_model` makes (same weights, patch embedding removed), without a task.

    A reuse run needs only the body's Linear costs and names, and the task's data may take minutes to build.
    """
    body = body_from_config(model_cfg)
    body.patch_embed = torch.nn.Identity()
    return body.eval().requires_grad_(False)


def read_gaps(cfg: Stage2Config, layers: List[str], weights: str) -> Dict[str, Any]:
    """The gap profile of ``rank.gaps_from``'s ``gaps.json``, checked against this run.

    Args:
        cfg: this run's config.
        layers: this body's feature layers (``rank_estimation.features.layer_names``).
        weights: this body's weights source (``body.orca_weights``).

    Returns:
        The gaps.json dict without ``chosen`` (the form :func:`measure_gaps` returns); its provenance gains
        ``gaps_from``.

    Raises:
        ConfigError: no such directory or no gaps.json in it; not a stage-2 gaps.json, measured for another task / body / weights / target embedder
            or other layers, or ``rank.gap_metric`` was not measured.
    """
    where = cfg.rank.gaps_from
    head = f"rank.gaps_from={where!r}"
    if not Path(where).is_dir():
        raise ConfigError(f"{head}: no such directory; point it at a finished stage-2 run directory")
    if cfg.run_dir and Path(cfg.run_dir).resolve() == Path(where).resolve():
        raise ConfigError(f"{head}: run_dir is that same directory; its rank map would be overwritten, so give "
                         f"this run its own run_dir")
    path = Path(where) / "gaps.json"
    if not path.is_file():
        raise ConfigError(f"{head}: no gaps.json there; point it at a finished stage-2 run directory")
    with reading(path, "a stage-2 gap profile", "rerun that stage-2 run, or leave rank.gaps_from unset"):
        gaps = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in GAPS_KEYS if not isinstance(gaps, dict) or k not in gaps]
    if missing:
        raise ConfigError(f"{head}: {path} is not a stage-2 gaps.json (missing {missing})")
    prov = gaps["provenance"]
    here = {"task": cfg.task.name, "body": cfg.model.body, "weights": weights,
            "target_embedder": target_embedder(cfg.model)}
    differ = [f"{k} {prov.get(k)!r} there, {v!r} here" for k, v in here.items() if not same_origin(prov.get(k), v)]
    if differ:
        raise ConfigError(f"{head}: that gap profile was measured on another setup ({'; '.join(differ)}); "
                         f"reuse needs the same task, body, weights and target embedder, so measure this one "
                         f"(leave rank.gaps_from unset)")
    if gaps["layers"] != layers:
        raise ConfigError(f"{head}: the profile's layers {gaps['layers']} are not this body's {layers} "
                         f"(model.body_kwargs differ?)")
    if cfg.rank.gap_metric not in gaps["metrics"]:
        raise ConfigError(f"{head}: rank.gap_metric={cfg.rank.gap_metric!r} was not measured there; that profile "
                         f"has {list(gaps['metrics'])}")
    gaps.pop("chosen", None)
    gaps["provenance"] = {**prov, "gaps_from": where}
    return gaps


def measure_gaps(cfg: Stage2Config, task, model: torch.nn.Module, positions: List[int],
                 metrics: List[str]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Capture source and target features at every layer and measure the gap profile (the slow half).

    Args:
        cfg: the run's config.
        task: the target task (its training inputs form the target stream).
        model: the target model (stage 1's embedder when ``model.embedder_from`` is set) in eval mode.
        positions: target training items to use (:func:`target_positions`).
        metrics: the metrics to measure (:func:`stage2_metrics`).

    Returns:
        ``(gaps, timing)``: the gap profile with ``dims`` and ``provenance`` (gaps.json without ``chosen``),
        and seconds per phase.
    """
    r = cfg.rank
    device = resolve_device(cfg.train.device)
    source_name = r.source or cfg.align.source
    source_options = dict(r.source_options if r.source_options is not None
                          else (cfg.align.source_options if r.source is None else {}))
    seed_everything(cfg.seed, cfg.train.deterministic)  # the same random draw as the body (module docstring)
    src_embedder = source_embedder(cfg.model).eval().requires_grad_(False)

    times: Dict[str, float] = {}
    t = time.time()
    src_images, src_labels = source_feature_set(source_name, r.n_source, image_size=cfg.model.img_size, seed=cfg.seed,
                                                data_root=cfg.task.data_root, options=source_options, device=device)
    tgt_inputs = fetch_inputs(task.train, positions, cfg.seed)
    tgt_labels, how = (target_labels(task, positions, cfg.align, cfg.seed) if "otdd" in metrics else (None, None))
    times["data_s"] = time.time() - t

    t = time.time()
    model.to(device)
    capture = dict(pool=r.pool, device=device, batch_size=r.batch_size, amp=cfg.train.amp,
                   tokens_per_sample=r.tokens_per_sample, seed=cfg.seed)
    src = capture_block_features(model, src_images, embedder=src_embedder.to(device), desc="stage2 source", **capture)
    tgt = capture_block_features(model, tgt_inputs, desc="stage2 target", **capture)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times["capture_s"] = time.time() - t
    del src_images, src_embedder

    t = time.time()
    labels = {"source_labels": src_labels, "target_labels": tgt_labels} if "otdd" in metrics else {}
    profile = measure_profile(src, tgt, metrics, r, cfg.seed, device, **labels)
    profile["settings"].update(n_source=int(src_labels.shape[0]), n_target=len(positions))  # images, not rows
    times["gaps_s"] = time.time() - t

    profile["dims"] = {layer: int(src[layer].shape[1]) for layer in profile["layers"]}
    profile["provenance"] = {
        "task": cfg.task.name, "body": cfg.model.body, "weights": model.weights_source,
        "target_embedder": target_embedder(cfg.model),
        "source": {"name": source_name, "options": source_options, "n": int(src_labels.shape[0]),
                   "classes": int(torch.unique(src_labels).numel())},
        "n_target": len(positions), "target_labels": how, "pool": r.pool,
        "tokens_per_sample": r.tokens_per_sample if r.pool == "tokens" else None, "seed": cfg.seed,
    }
    return profile, times


def allocate_and_write(cfg: Stage2Config, run: RunDir, gaps: Dict[str, Any], body: torch.nn.Module,
                       costs: Dict[str, int], times: Dict[str, Optional[float]], t0: float) -> None:
    """D_i from a gap profile, the rank allocation under ``rank.budget``, and every output file of the run.

    Args:
        cfg: the run's config.
        run: the run directory.
        gaps: a gap profile as :func:`measure_gaps` or :func:`read_gaps` returns it.
        body: the body (for stage 3's coverage check).
        costs: per-unit-rank cost of each targeted Linear, in forward order.
        times: seconds per phase so far (``allocate_s`` is added).
        t0: when the run started (for the wall time).
    """
    r = cfg.rank
    provenance = gaps["provenance"]
    blocks = [layer for layer in gaps["layers"] if layer != EMBED]
    d_block, clipped = block_gaps(gaps, r.gap_metric, blocks)
    if clipped:
        warnings.warn(f"{r.gap_metric} < 0 (unresolved) at {len(clipped)} blocks, clipped to 0: {clipped}",
                      RuntimeWarning, stacklevel=3)
    t = time.time()
    alloc = allocate_from_config(expand(d_block, list(costs)), costs, r)
    times["allocate_s"] = time.time() - t

    uncovered = stage3_coverage(body, cfg.adapter, alloc.rank_map)
    if uncovered:
        warnings.warn(f"stage 3 with adapter.targets={cfg.adapter.targets!r} also adapts {len(uncovered)} Linears that "
                      f"the rank map does not name (e.g. {uncovered[0]}); they would get the uniform adapter.rank, "
                      f"outside the budget: set rank.targets to cover adapter.targets", RuntimeWarning, stacklevel=3)
    chosen = {b: gaps["values"][b][r.gap_metric] for b in blocks}
    rank_map_path = run.file(RANK_MAP_FILE)
    payload = json.loads(alloc.to_json())
    payload.update({
        "gap_metric": r.gap_metric, "targets": r.targets,
        "gap_profile": {"layers": blocks, "D": [d_block[b] for b in blocks],
                        "value": [chosen[b]["value"] for b in blocks], "lo": [chosen[b]["lo"] for b in blocks],
                        "hi": [chosen[b]["hi"] for b in blocks], "clipped": clipped},
        "stage3": {"override": f"adapter.rank_map={rank_map_path}", "command": stage3_command(cfg, run),
                   "uncovered_by_adapter_targets": uncovered},
        "provenance": provenance,
    })
    write_json(rank_map_path, payload)
    write_profile_files(cfg, run, gaps)
    plot_ranks(alloc, blocks, chosen, r.gap_metric, run.file("ranks.png"))

    wall = time.time() - t0
    summary = {
        **profile_summary(cfg, run, gaps, body, times),
        "budget": alloc.budget, "trainable": alloc.trainable, "tolerance": alloc.tolerance,
        "n_modules": len(alloc.rank_map), "rank_range": [min(alloc.rank_map.values()), max(alloc.rank_map.values())],
        "max_rhat": alloc.diagnostics.get("max_rhat"), "rank_map": str(rank_map_path), "wall_time_s": wall,
    }
    run.write_summary(summary)
    run.close()
    per_metric = ", ".join(f"{m} {s:.2f}s" for m, s in gaps["seconds"].items())
    how = f"reused from {r.gaps_from}; measuring took " if r.gaps_from else ""
    print(f"[stage2] gaps at {len(gaps['layers'])} layers ({how}{per_metric}); {len(alloc.rank_map)} modules, "
          f"{alloc.trainable:,} parameters for budget {alloc.budget:,}, ranks "
          f"{summary['rank_range'][0]}..{summary['rank_range'][1]}; {wall:.1f}s", flush=True)
    print(f"[stage2] rank map: {rank_map_path}", flush=True)
    print(f"[stage2] next: {stage3_command(cfg, run)}", flush=True)


def write_profile_files(cfg: Stage2Config, run: RunDir, gaps: Dict[str, Any]) -> None:
    """The gap profile's files: ``gaps.json`` (every metric at every layer, with its intervals) and its plot."""
    write_json(run.file("gaps.json"), {**gaps, "chosen": cfg.rank.gap_metric})
    plot_gaps(gaps, cfg.rank.gap_metric, run.file("gaps.png"))


def profile_summary(cfg: Stage2Config, run: RunDir, gaps: Dict[str, Any], body: torch.nn.Module,
                    times: Dict[str, Optional[float]]) -> Dict[str, Any]:
    """The summary fields of a stage-2 run that describe its gap profile (an allocation adds its own)."""
    r = cfg.rank
    return {
        "stage": "stage2", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed, "body": cfg.model.body,
        "weights": body.orca_weights, "target_embedder": target_embedder(cfg.model),
        "gap_metric": r.gap_metric, "metrics": list(gaps["metrics"]), "gaps_from": r.gaps_from,
        "seconds_per_metric": gaps["seconds"], "timing_s": times, "source": gaps["provenance"]["source"],
        "n_target": gaps["provenance"]["n_target"], "git": git_info(), "machine": machine_info(),
        "command": " ".join(sys.argv), "run_dir": str(run.path),
    }


def write_profile(cfg: Stage2Config, run: RunDir, gaps: Dict[str, Any], body: torch.nn.Module,
                  times: Dict[str, Optional[float]], t0: float) -> None:
    """A run with ``rank.allocate=false``: the measured gap profile and its summary, no rank map.

    Why a profile may stand alone: the gap is the measurement (of how far a task sits from the
    body's source at every block); a task at the source distribution itself has a gap unresolved
    at every block, which no allocation can turn into ranks but which is the measured result."""
    write_profile_files(cfg, run, gaps)
    blocks = [layer for layer in gaps["layers"] if layer != EMBED]
    unresolved = [b for b in blocks if gaps["values"][b][cfg.rank.gap_metric]["value"] <= 0]
    wall = time.time() - t0
    run.write_summary({**profile_summary(cfg, run, gaps, body, times), "rank_map": None,
                       "unresolved_blocks": unresolved, "wall_time_s": wall})
    run.close()
    per_metric = ", ".join(f"{m} {s:.2f}s" for m, s in gaps["seconds"].items())
    print(f"[stage2] gaps at {len(gaps['layers'])} layers ({per_metric}); {cfg.rank.gap_metric} unresolved "
          f"(<= 0) at {len(unresolved)} of {len(blocks)} blocks; no rank map (rank.allocate=false); "
          f"{wall:.1f}s", flush=True)
    print(f"[stage2] next: the same config with rank.allocate=true rank.gaps_from={run.path} and a rank.budget "
          f"allocates ranks from this profile", flush=True)


def stage3_command(cfg: Stage2Config, run: RunDir) -> str:
    """Stage 3 with this run's settings, its rank map, and the aligned embedder its gaps were measured through."""
    overrides = [] if cfg.adapter.method in ("lora", "dylora", "delta_lora", "qlora") else ["adapter.method=lora"]
    overrides.append(f"adapter.rank_map={run.file(RANK_MAP_FILE)}")
    if cfg.model.embedder_from:
        overrides.append(f"model.embedder_from={cfg.model.embedder_from}")
    return next_command("stage3", run.file("config.yaml"), overrides)


def run_stage2(cfg: Stage2Config) -> RunDir:
    """Measure the gap profile (or read ``rank.gaps_from``'s), allocate ranks under the budget, write the rank
    map; return the run dir.

    Args:
        cfg: the resolved experiment config (``cfg.rank`` holds the stage-2 options).
    """
    t0 = time.time()
    r = cfg.rank
    metrics = stage2_metrics(r)

    seed_everything(cfg.seed, cfg.train.deterministic)
    if r.gaps_from:  # the allocation needs only the body: no task data, no target positions
        task = positions = model = None
        body = body_only(cfg.model)
    else:
        task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
        positions = target_positions(len(task.train), r.n_target, cfg.seed)
        seed_everything(cfg.seed, cfg.train.deterministic)
        model = build_model(cfg.model, task).eval().requires_grad_(False)
        body = model.body
    costs = costs_from_model(body, r.targets)
    try:  # before any image is embedded
        check_budget(costs, r.budget, r.r_min, r.r_max)
    except ValueError as err:
        raise ConfigError(f"rank.budget / rank.r_min / rank.r_max (rank.targets={r.targets!r} on "
                         f"{cfg.model.body}): {err}") from None
    check_embedder_from(cfg, body.orca_weights)  # before the run directory exists
    if r.gaps_from:  # checked before the run directory exists
        t = time.time()
        gaps = read_gaps(cfg, layer_names(body), body.orca_weights)
        times: Dict[str, Optional[float]] = {"data_s": None, "capture_s": None, "gaps_s": None,
                                             "read_gaps_s": time.time() - t}

    run = RunDir.create(cfg, "stage2")
    facts = {"stage": "stage2", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed,
             "body": cfg.model.body, "target_embedder": target_embedder(cfg.model), "run_dir": str(run.path)}
    run.begin(config_yaml(cfg), facts)
    print(f"[stage2] run directory: {run.path}", flush=True)
    print(f"[stage2] body {cfg.model.body} ({body.orca_weights}); target embedder: {target_embedder(cfg.model)}",
          flush=True)
    with run.failure_recorded(facts):
        if r.gaps_from:
            print(f"[stage2] gap profile from {r.gaps_from}/gaps.json: no feature capture, no gap measurement",
                  flush=True)
        else:
            gaps, times = measure_gaps(cfg, task, model, positions, metrics)
        if r.allocate:
            allocate_and_write(cfg, run, gaps, body, costs, times, t0)
        else:
            write_profile(cfg, run, gaps, body, times, t0)
    return run
