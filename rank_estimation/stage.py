"""Stage 2: per-block modality gaps D_1..D_L -> IBP rank posterior P(r | D) -> a budgeted LoRA rank map.

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
   Target stream: the first ``rank.n_target`` target training inputs through the model's embedder
   (stage 1's when ``model.embedder_from`` is set, else the initial one), then the same body.
   Features are hooked at the embedder and every block (``rank_estimation.features``).
3. Every metric of ``rank.metrics`` at every layer with bootstrap intervals
   (``rank_estimation.gaps``); otdd labels the target with k-means clusters for regression tasks,
   exactly as stage 1 does (``align.n_clusters``).
4. D_i = ``rank.gap_metric`` at block i, expanded onto the block's Linear modules, allocated under
   ``rank.budget`` (``rank_estimation.allocate``).
5. ``rank_map.json`` (stage 3's ``adapter.rank_map``), ``gaps.json``, ``gaps.png``, ``ranks.png``,
   ``config.yaml``, ``summary.json`` in the run directory.

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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from datasets.registry import build_task
from orca.config import ExperimentConfig, save_config
from orca.model import build_model, source_embedder
from orca.runs import RunDir, git_info, machine_info, save_png, write_json
from orca.train import resolve_device, seed_everything
from rank_estimation.allocate import RankAllocation, allocate_from_config, check_budget, costs_from_model, expand
from rank_estimation.features import EMBED, capture_block_features

RANK_MAP_FILE = "rank_map.json"


# ----------------------------------------------------------------------------- checks
def stage2_metrics(rank_cfg) -> List[str]:
    """The metrics to measure: ``rank.metrics`` plus ``rank.gap_metric``, each checked against the registry."""
    from rank_estimation.gaps import GAP_METRICS

    metrics = list(rank_cfg.metrics)
    if rank_cfg.gap_metric not in metrics:
        metrics.append(rank_cfg.gap_metric)
    for name in metrics:
        if name not in GAP_METRICS:
            field = "rank.gap_metric" if name == rank_cfg.gap_metric else "rank.metrics"
            raise ValueError(f"{field}: {GAP_METRICS.unknown_message(name)}")
    extra = sorted(set(rank_cfg.metric_kwargs) - set(metrics))
    if extra:
        raise ValueError(f"rank.metric_kwargs has options for metrics that are not measured: {extra} "
                         f"(measured: {metrics})")
    return metrics


def target_positions(n_train: int, n_target: Optional[int]) -> List[int]:
    """The first ``n_target`` training items (all when None)."""
    if n_train < 2:
        raise ValueError(f"the target task has {n_train} training samples; a gap needs at least 2")
    if n_target is not None and n_target > n_train:
        raise ValueError(f"rank.n_target={n_target} exceeds the {n_train} training samples of the target task; "
                         f"lower it or set it to null (all)")
    return list(range(n_train if n_target is None else n_target))


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
        raise ValueError(f"gap metric {metric!r} is <= 0 at every block ({', '.join(f'{v:.3g}' for v in raw.values())}): "
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
    from rank_estimation.gaps import gap_profile

    merged: Dict[str, Any] = {"layers": [], "metrics": metrics, "values": {}, "scale": {}, "rows": {},
                              "seconds": {m: 0.0 for m in metrics}}
    boot = [m for m in metrics if rank_cfg.boot_metrics is None or m in rank_cfg.boot_metrics]
    groups = [(ms, n) for ms, n in ((boot, rank_cfg.n_boot), ([m for m in metrics if m not in boot], 0)) if ms]
    for layer in tqdm(list(src), desc="stage2 gaps", unit="layer", dynamic_ncols=True, disable=None):
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
def run_stage2(cfg: ExperimentConfig) -> RunDir:
    """Measure the gap profile, allocate ranks under the budget, write the rank map; return the run dir.

    Args:
        cfg: the resolved experiment config (``cfg.rank`` holds the stage-2 options).
    """
    t0 = time.time()
    r = cfg.rank
    device = resolve_device(cfg.train.device)
    metrics = stage2_metrics(r)
    source_name = r.source or cfg.align.source
    source_options = dict(r.source_options if r.source_options is not None
                          else (cfg.align.source_options if r.source is None else {}))

    seed_everything(cfg.seed, cfg.train.deterministic)
    task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
    positions = target_positions(len(task.train), r.n_target)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg.model, task).eval().requires_grad_(False)
    costs = costs_from_model(model.body, r.targets)
    try:  # before any image is embedded
        check_budget(costs, r.budget, r.r_min, r.r_max)
    except ValueError as err:
        raise ValueError(f"rank.budget / rank.r_min / rank.r_max (rank.targets={r.targets!r} on "
                         f"{cfg.model.body}): {err}") from None
    seed_everything(cfg.seed, cfg.train.deterministic)
    src_embedder = source_embedder(cfg.model).eval().requires_grad_(False)

    run = RunDir.create(cfg, "stage2")
    save_config(cfg, run.file("config.yaml"))
    target_embedder = cfg.model.embedder_from or f"initial (model.embedder_init={cfg.model.embedder_init})"
    print(f"[stage2] run directory: {run.path}", flush=True)
    print(f"[stage2] body {cfg.model.body} ({model.weights_source}); target embedder: {target_embedder}", flush=True)

    from datasets.images import source_feature_set
    from orca.align.loop import fetch_inputs, target_labels

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

    blocks = [layer for layer in profile["layers"] if layer != EMBED]
    d_block, clipped = block_gaps(profile, r.gap_metric, blocks)
    if clipped:
        warnings.warn(f"{r.gap_metric} < 0 (unresolved) at {len(clipped)} blocks, clipped to 0: {clipped}",
                      RuntimeWarning, stacklevel=2)
    t = time.time()
    alloc = allocate_from_config(expand(d_block, list(costs)), costs, r)
    times["allocate_s"] = time.time() - t

    uncovered = stage3_coverage(model.body, cfg.adapter, alloc.rank_map)
    if uncovered:
        warnings.warn(f"stage 3 with adapter.targets={cfg.adapter.targets!r} also adapts {len(uncovered)} Linears that "
                      f"the rank map does not name (e.g. {uncovered[0]}); they would get the uniform adapter.rank, "
                      f"outside the budget: set rank.targets to cover adapter.targets", RuntimeWarning, stacklevel=2)
    chosen = {b: profile["values"][b][r.gap_metric] for b in blocks}
    dims = {layer: int(src[layer].shape[1]) for layer in profile["layers"]}
    provenance = {
        "task": cfg.task.name, "body": cfg.model.body, "weights": model.weights_source, "target_embedder": target_embedder,
        "source": {"name": source_name, "options": source_options, "n": int(src_labels.shape[0]),
                   "classes": int(torch.unique(src_labels).numel())},
        "n_target": len(positions), "target_labels": how, "pool": r.pool,
        "tokens_per_sample": r.tokens_per_sample if r.pool == "tokens" else None, "seed": cfg.seed,
    }
    rank_map_path = run.file(RANK_MAP_FILE)
    payload = json.loads(alloc.to_json())
    payload.update({
        "gap_metric": r.gap_metric, "targets": r.targets,
        "gap_profile": {"layers": blocks, "D": [d_block[b] for b in blocks],
                        "value": [chosen[b]["value"] for b in blocks], "lo": [chosen[b]["lo"] for b in blocks],
                        "hi": [chosen[b]["hi"] for b in blocks], "clipped": clipped},
        "stage3": {"override": f"adapter.rank_map={rank_map_path}",
                   "uncovered_by_adapter_targets": uncovered},
        "provenance": provenance,
    })
    write_json(rank_map_path, payload)
    write_json(run.file("gaps.json"), {**profile, "dims": dims, "chosen": r.gap_metric, "provenance": provenance})
    plot_gaps(profile, r.gap_metric, run.file("gaps.png"))
    plot_ranks(alloc, blocks, chosen, r.gap_metric, run.file("ranks.png"))

    wall = time.time() - t0
    summary = {
        "stage": "stage2", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed, "body": cfg.model.body,
        "weights": model.weights_source, "target_embedder": target_embedder, "gap_metric": r.gap_metric,
        "metrics": metrics, "seconds_per_metric": profile["seconds"], "timing_s": times,
        "budget": alloc.budget, "trainable": alloc.trainable, "tolerance": alloc.tolerance,
        "n_modules": len(alloc.rank_map), "rank_range": [min(alloc.rank_map.values()), max(alloc.rank_map.values())],
        "max_rhat": alloc.diagnostics.get("max_rhat"), "source": provenance["source"], "n_target": len(positions),
        "rank_map": str(rank_map_path), "wall_time_s": wall, "git": git_info(), "machine": machine_info(),
        "command": " ".join(sys.argv), "run_dir": str(run.path),
    }
    run.write_summary(summary)
    run.close()
    per_metric = ", ".join(f"{m} {s:.2f}s" for m, s in profile["seconds"].items())
    print(f"[stage2] gaps at {len(profile['layers'])} layers ({per_metric}); {len(alloc.rank_map)} modules, "
          f"{alloc.trainable:,} parameters for budget {alloc.budget:,}, ranks "
          f"{summary['rank_range'][0]}..{summary['rank_range'][1]}; {wall:.1f}s", flush=True)
    print(f"[stage2] rank map: {rank_map_path}", flush=True)
    print(f"[stage2] next: bash scripts/stage3.sh CONFIG adapter.method=lora adapter.rank_map={rank_map_path}",
          flush=True)
    return run
