"""Stage 1: align a new target embedder to the source feature distribution (ORCA), body frozen.

    python -m orca stage1 --config configs/darcy_tiny.yaml
    bash scripts/stage1.sh configs/darcy_swinb.yaml align.objective=mmd seed=1
    bash scripts/stage1.sh configs/darcy_swinb.yaml align.mode=source_init      # the ablation: no training
    python -m orca stage3 --config configs/darcy_swinb.yaml model.embedder_from=runs/stage1__darcy__...

ORCA's recipe (stage 1): source = N labelled images through the body's pretrained patch
embedding, token-averaged (cached, see ``orca.align.source_features``); target = the new embedder's
outputs on the target training inputs, token-averaged; target labels = the real classes, or k-means
clusters of the flattened targets for regression; loss = class-frequency-weighted sum over target
clusters of objective(cluster, labelled source set), each cluster a single-label set; one AdamW step
per epoch over the full target set (ORCA accumulates the per-cluster gradients, then steps once).
The objectives (``orca.align.objectives``) take the whole labelled target set and compute that
weighted sum in one batched call; like ORCA they skip clusters of one sample.

Why the gradient is taken in two passes: the full-set step needs d(objective)/d(embedder) over every
target input, and keeping the embedder's activations for all of them (45k CIFAR images at 224 px)
does not fit in memory. Pass 1 embeds the inputs without autograd, the objective is differentiated
w.r.t. those features only, and pass 2 re-embeds the inputs chunk by chunk and back-propagates each
chunk's feature gradient. That is the exact full-batch gradient at O(chunk) memory. Random
augmentations are replayed identically in both passes (each chunk's RNG is seeded from
(seed, epoch, chunk)). With ``align.steps_per_epoch > 1`` each step uses a seeded minibatch.

``objective[e]`` in ``alignment.json`` is the full-target-set objective after ``e`` epochs
(``objective[0]`` = the source-initialised embedder). With one step per epoch it is the value the
step itself computed, so recording it costs nothing extra.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from datasets.progress import Progress
from datasets.registry import TaskData, build_task
from orca.align.objectives import OBJECTIVES
from orca.align.source_features import SourceFeatures, load_or_compute_source_features, token_mean
from orca.config import ExperimentConfig, config_yaml
from orca.model import EMBEDDER_FILE, build_model
from orca.provenance import next_command
from orca.runs import RunDir, atomic_write_bytes, git_info, machine_info, save_png, write_json
from orca.runtime import fetch_inputs, resolve_device, seed_everything, target_indices, target_labels

#: ``objective(target_feats [n, d], target_labels [n], source_feats [m, d], source_labels [m]) -> scalar``
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the objective
def build_objective(align_cfg, seed: int):
    """The registered objective of ``align.objective`` with the stage-1 settings applied.

    The objective takes the whole labelled target set and returns ORCA's class-frequency-weighted
    sum over target clusters (each a single-label set) of objective(cluster, labelled source) in one
    batched call (``orca.align.objectives``) -- the same number as ORCA's loop of per-cluster calls.
    ``align.entreg`` / ``align.inner`` set OTDD's ``reg`` / ``inner``; ``align.objective_options``
    passes any other constructor option (and wins over those two).

    Args:
        align_cfg: the AlignConfig.
        seed: seed of the objective's subsamples (exact-OT class caps, MMD median).
    Returns:
        an ``AlignmentObjective``: ``objective(target_feats [n, d], target_labels [n],
        source_feats [m, d], source_labels [m]) -> scalar``.
    """
    cls = OBJECTIVES.get(align_cfg.objective)
    kwargs: Dict[str, Any] = {"seed": seed} if align_cfg.objective in ("otdd", "mmd") else {}
    if align_cfg.objective == "otdd":
        kwargs.update(reg=align_cfg.entreg, inner=align_cfg.inner)
    kwargs.update(align_cfg.objective_options)
    try:
        return cls(**kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"align.objective_options={dict(align_cfg.objective_options)} do not fit objective "
                         f"{align_cfg.objective!r} ({err}); its options are: {', '.join(params)}") from None


# ----------------------------------------------------------------------------- checks
def check_source(src: SourceFeatures, align_cfg, needs_labels: bool) -> None:
    """Refuse NaN source features, and a single-label source for label-aware objectives (OTDD)."""
    feats, labels = src.feats, src.labels
    bad = int((~torch.isfinite(feats)).any(1).sum())
    if bad:
        raise ValueError(f"source features contain NaN/inf in {bad} of {feats.shape[0]} rows "
                         f"(align.source={align_cfg.source!r}, cache {src.path}); delete that file and rerun")
    classes = torch.unique(labels)
    if needs_labels and classes.numel() < 2:
        raise ValueError(f"the source set has a single label ({int(classes[0])}): align.source={align_cfg.source!r} "
                         f"with n_source={align_cfg.n_source} and source_options={dict(align_cfg.source_options)} "
                         f"gave one class. align.objective={align_cfg.objective!r} needs a labelled source with >= 2 "
                         f"classes (with one, the label term is a constant); use more classes or source samples")


def raise_nonfinite_target(x: torch.Tensor, feats: torch.Tensor, items: Sequence[int], epoch: int) -> None:
    """Raise naming the cause of non-finite target features: NaN inputs, or a diverged embedder.

    Args:
        x: ``[b, C, H, W]`` the inputs of one chunk.
        feats: ``[b, D]`` their features.
        items: the training-set indices of those inputs.
        epoch: for the message.
    """
    bad_rows = (~torch.isfinite(feats).all(1)).nonzero().squeeze(1).tolist()
    bad_inputs = (~torch.isfinite(x.flatten(1)).all(1)).nonzero().squeeze(1).tolist()
    if bad_inputs:
        raise ValueError(f"target inputs contain NaN/inf (training sample {items[bad_inputs[0]]} of task.train, "
                         f"{len(bad_inputs)} in this chunk), so the target features are NaN; fix the target data")
    raise FloatingPointError(f"target features became NaN/inf at epoch {epoch} ({len(bad_rows)} rows, first "
                             f"training sample {items[bad_rows[0]]}) although the inputs are finite: the embedder "
                             f"diverged; lower align.lr")


def check_dims(target_dim: int, src: SourceFeatures, model_cfg) -> None:
    """Source and target features must live in the same space (the body's token width)."""
    if src.feats.shape[1] != target_dim:
        raise ValueError(f"feature dimensions differ: source features have dimension {src.feats.shape[1]} "
                         f"(cache {src.path}) but the target embedder outputs {target_dim} "
                         f"(model.body={model_cfg.body}, body_kwargs={model_cfg.body_kwargs})")


# ----------------------------------------------------------------------------- one step
class TargetEmbedding:
    """The target side of one run: which inputs, their labels, and chunked embedding passes.

    Args:
        embedder: the trainable target embedder (on ``device``).
        dataset: the target training set.
        indices: its items used for alignment.
        labels: ``[n]`` target labels for those items.
        chunk: inputs per forward pass.
        device: where the embedder runs.
        seed: base of the per-chunk augmentation seeds.
    """

    def __init__(self, embedder: nn.Module, dataset, indices: Sequence[int], labels: torch.Tensor, chunk: int,
                 device: torch.device, seed: int):
        self.embedder, self.dataset, self.indices = embedder, dataset, list(indices)
        self.labels, self.chunk, self.device, self.seed = labels, chunk, device, seed

    def _chunks(self, positions: Sequence[int], epoch: int):
        """``(start, positions, items, rng seed)`` per chunk; the seed depends on (seed, epoch, chunk) only."""
        for c, start in enumerate(range(0, len(positions), self.chunk)):
            pos = list(positions[start:start + self.chunk])
            seed = (self.seed * 1_000_003 + epoch * 10_007 + c) % 2**63
            yield start, pos, [self.indices[p] for p in pos], seed

    @torch.no_grad()
    def features(self, positions: Sequence[int], epoch: int) -> torch.Tensor:
        """Token-averaged features ``[len(positions), D]`` (no autograd), on the device."""
        out = []
        for _, _, items, seed in self._chunks(positions, epoch):
            x = fetch_inputs(self.dataset, items, seed).to(self.device)
            feats = token_mean(self.embedder(x)).float()
            if not torch.isfinite(feats).all():
                raise_nonfinite_target(x, feats, items, epoch)
            out.append(feats)
        return torch.cat(out)

    def backward(self, positions: Sequence[int], epoch: int, grad: torch.Tensor) -> None:
        """Accumulate d(objective)/d(embedder) from ``grad [len(positions), D]`` w.r.t. the features."""
        for start, pos, items, seed in self._chunks(positions, epoch):
            x = fetch_inputs(self.dataset, items, seed).to(self.device)
            token_mean(self.embedder(x)).float().backward(grad[start:start + len(pos)])


def objective_value(objective: Objective, target: TargetEmbedding, positions: Sequence[int], epoch: int,
                    src_feats: torch.Tensor, src_labels: torch.Tensor, with_grad: bool) -> float:
    """The weighted objective on ``positions``; with ``with_grad`` also accumulate the embedder's gradient."""
    feats = target.features(positions, epoch)
    labels = target.labels[list(positions)]
    feats.requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        value = objective(feats, labels.to(feats.device), src_feats, src_labels)
    if not torch.isfinite(value):
        raise FloatingPointError(f"the alignment objective is {float(value)} at epoch {epoch}; lower align.lr")
    if not with_grad:
        return float(value)
    (grad,) = torch.autograd.grad(value, feats)
    target.backward(positions, epoch, grad)
    return float(value.detach())


def align_embedder(objective: Objective, target: TargetEmbedding, src_feats: torch.Tensor,
                   src_labels: torch.Tensor, align_cfg, optimizer: torch.optim.Optimizer, run: RunDir,
                   seed: int) -> Tuple[List[float], List[float]]:
    """ORCA's alignment loop: ``epochs`` x ``steps_per_epoch`` AdamW steps on the weighted objective.

    Args:
        objective: per-cluster objective (``build_objective``).
        target: the target side (embedder, inputs, labels).
        src_feats: ``[m, D]`` source features on the embedder's device.
        src_labels: ``[m]`` their labels.
        align_cfg: the AlignConfig (epochs, steps_per_epoch, objective name).
        optimizer: over the embedder's parameters.
        run: receives one ``metrics.jsonl`` row per epoch.
        seed: minibatch order (steps_per_epoch > 1).
    Returns:
        ``(curve, epoch_times)``: the full-set objective after 0..epochs epochs, seconds per epoch.
    """
    a = align_cfg
    n = len(target.indices)
    everyone = list(range(n))
    order = torch.Generator().manual_seed(seed)
    curve: List[float] = []
    times: List[float] = []
    lr = optimizer.param_groups[0]["lr"]
    target.embedder.train()
    with Progress(total=a.epochs, desc=f"stage1 {a.objective}", unit="epoch") as bar:
        for epoch in range(a.epochs):
            t_ep = time.time()
            if a.steps_per_epoch == 1:  # ORCA: the step's own full-set value is the curve point
                curve.append(objective_value(objective, target, everyone, epoch, src_feats, src_labels, with_grad=True))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                curve.append(objective_value(objective, target, everyone, epoch, src_feats, src_labels, with_grad=False))
                perm = torch.randperm(n, generator=order).tolist()
                size = math.ceil(n / a.steps_per_epoch)
                for batch in (perm[i:i + size] for i in range(0, n, size)):
                    objective_value(objective, target, batch, epoch, src_feats, src_labels, with_grad=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            times.append(time.time() - t_ep)
            run.log_metrics({"kind": "align", "epoch": epoch, f"align/{a.objective}": curve[-1], "align/lr": lr})
            bar.set_postfix(objective=f"{curve[-1]:.4g}")
            bar.update(1)
    target.embedder.eval()
    curve.append(objective_value(objective, target, everyone, a.epochs, src_feats, src_labels, with_grad=False))
    run.log_metrics({"kind": "align", "epoch": a.epochs, f"align/{a.objective}": curve[-1], "align/lr": lr})
    return curve, times


# ----------------------------------------------------------------------------- outputs
def objective_settings(objective) -> Dict[str, Any]:
    """The objective's settings as plain data, for ``alignment.json``."""
    keep = (int, float, str, bool, tuple, type(None))
    out = {k: v for k, v in vars(objective).items() if isinstance(v, keep)}
    inner = getattr(objective, "otdd", None)
    if inner is not None:
        out.update(inner=inner.inner, reg=inner.reg, cost=inner.cost, debiased=inner.debiased, inner_reg=inner.inner_reg,
                   inner_max_samples=inner.inner_max_samples)
    return out


def save_embedder(embedder: nn.Module, run: RunDir) -> str:
    """Write the embedder's state dict as ``embedder.safetensors`` (read by ``model.embedder_from``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in embedder.state_dict().items()}
    path = run.file(EMBEDDER_FILE)
    atomic_write_bytes(path, lambda tmp: save_file(state, str(tmp)))
    return str(path)


def plot_curve(curve: List[float], path, title: str) -> None:
    """Objective vs epoch (epoch 0 = source init), as ``alignment.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(range(len(curve)), curve, marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("objective")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_png(fig, path)


# ----------------------------------------------------------------------------- the stage
def run_stage1(cfg: ExperimentConfig) -> RunDir:
    """Align (or, with ``align.mode=source_init``, only initialise) the target embedder; return the run dir.

    Args:
        cfg: the resolved experiment config (``cfg.align`` holds the stage-1 options).
    """
    t0 = time.time()
    a = cfg.align
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed, cfg.train.deterministic)
    task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
    run = RunDir.create(cfg, "stage1")
    facts = {"stage": "stage1", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed, "mode": a.mode,
             "objective": a.objective, "body": cfg.model.body, "run_dir": str(run.path)}
    run.begin(config_yaml(cfg), facts)
    print(f"[stage1] run directory: {run.path}", flush=True)
    with run.failure_recorded(facts):
        return _align_and_save(cfg, run, task, device, t0)


def _align_and_save(cfg: ExperimentConfig, run: RunDir, task: TaskData, device: torch.device, t0: float) -> RunDir:
    """Stage 1 once its run directory has begun: align, save the embedder, write the outputs."""
    a = cfg.align
    record: Dict[str, Any] = {"mode": a.mode, "objective_name": a.objective, "epochs": 0, "objective": []}
    if a.mode == "train":  # cheap checks first: fail on a bad k before the source set is rendered
        objective = build_objective(a, cfg.seed)
        indices = target_indices(len(task.train), a.n_target)
        labels, how = target_labels(task, indices, a, cfg.seed)
        # Seeded right before, so with model.weights=none the source embedder's random body is the
        # very body build_model draws below (both are the first draws after the same seed).
        seed_everything(cfg.seed, cfg.train.deterministic)
        src = load_or_compute_source_features(cfg.model, a, cfg.seed, cfg.task.data_root, device)
        check_source(src, a, objective.needs_source_labels)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg.model, task)
    embedder, weights_source = model.embedder.to(device), model.weights_source
    del model  # stage 1 trains only the embedder; the body is not needed after it shaped the embedder

    if a.mode == "source_init":
        record["note"] = "source_init: the pretrained patch embedding tiled over the input channels, not trained"
    else:
        target = TargetEmbedding(embedder, task.train, indices, labels, a.batch_size, device, cfg.seed)
        src_feats, src_labels = src.feats.to(device), src.labels.to(device)
        check_dims(int(target.features([0], 0).shape[1]), src, cfg.model)
        lr = a.lr if a.lr is not None else 10 * cfg.train.lr  # ORCA: 10 x the fine-tuning lr
        optimizer = torch.optim.AdamW(embedder.parameters(), lr=lr, betas=tuple(cfg.train.betas),
                                      weight_decay=cfg.train.weight_decay)
        curve, times = align_embedder(objective, target, src_feats, src_labels, a, optimizer, run, cfg.seed)
        ids, counts = torch.unique(labels, return_counts=True)
        record.update(epochs=a.epochs, objective=curve, epoch_time_s=times, lr=lr, steps_per_epoch=a.steps_per_epoch,
                      source=src.describe(), n_target=len(indices), target_labels=how, k=int(ids.numel()),
                      cluster_sizes=counts.tolist(), objective_settings=objective_settings(objective))
        plot_curve(curve, run.file("alignment.png"),
                   f"{a.objective}: {cfg.task.name} vs {a.source} (n={src.feats.shape[0]}, k={int(ids.numel())})")
    embedder_path = save_embedder(embedder, run)
    wall = time.time() - t0
    record["time_s"] = wall
    write_json(run.file("alignment.json"), record)
    curve = record["objective"]
    summary = {
        "stage": "stage1", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed, "mode": a.mode,
        "objective": a.objective, "body": cfg.model.body, "weights": weights_source,
        "objective_first": curve[0] if curve else None, "objective_last": curve[-1] if curve else None,
        "epochs": record["epochs"], "source": record.get("source"), "n_target": record.get("n_target"),
        "k": record.get("k"), "embedder": embedder_path, "wall_time_s": wall, "git": git_info(),
        "machine": machine_info(), "command": " ".join(sys.argv), "run_dir": str(run.path),
    }
    run.write_summary(summary)
    run.close()
    if curve:
        print(f"[stage1] {a.objective} {curve[0]:.5g} -> {curve[-1]:.5g} over {a.epochs} epochs "
              f"(source {a.source} n={record['source']['n']}, k={record['k']}) in {wall:.1f}s; "
              f"embedder: {embedder_path}", flush=True)
    else:
        print(f"[stage1] source_init: saved the source-initialised embedder in {wall:.1f}s: {embedder_path}", flush=True)
    products = [f"model.embedder_from={run.path}"]
    print(f"[stage1] next: {next_command('stage2', run.file('config.yaml'), products)}", flush=True)
    print(f"[stage1]   or: {next_command('stage3', run.file('config.yaml'), products)}", flush=True)
    return run
