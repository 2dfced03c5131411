"""Packed stage 3: up to K sweep runs trained in lockstep through one shared frozen body.

Why this file is long: the pack's run loop keeps every run's own state (data, schedule, clipping,
best checkpoint, failure) beside the shared step, which splitting would scatter; the packed model
is orca/packed_model.py and its optimizer orca/packed_optim.py.

    bash scripts/sweep.sh configs/experiments/table3_darcy_all.yaml --pack 24

Why: a sweep of short LoRA runs on a small body leaves a GPU mostly idle, bound by kernel
launches at batch 16; K processes side by side each hold a body, a CUDA context and their own
launches. Here one process holds the body once and every step is one forward/backward over all K
runs' batches (:mod:`orca.packed_model`), so a launch carries K x 16 images.

Each run stays itself: its own seed and initial weights (built exactly as ``run_stage3`` builds
them), data order, AdamW state, learning-rate schedule, gradient clipping, best-by-validation
checkpoint, ``metrics.jsonl``, ``summary.json`` and ``ckpt/{last,best}.pt`` in the format of a
run trained alone (a packed run's checkpoint resumes alone and vice versa). Under
``train.deterministic=true`` on the CPU a packed run reproduces the run alone to float rounding
(``tests/test_packed.py``). A run whose loss turns non-finite fails alone, with the message it would
have failed with; the others go on.

What packs: methods ``lora`` and ``head`` (rank 0) with AdamW, no LoRA dropout, no trained norms,
one micro-batch per step; runs whose task, body, batch size, epochs and the rest of the recipe agree
(:func:`pack_key`) and that stand at the same point of training. Per run may differ: seed, rank or
rank map, targets, alpha, rsLoRA, LoRA+ ratio, lr, weight decay, warm-up, clipping, which of
embedder and head train, a stage-1 embedder. Everything else trains alone, as before
(:func:`why_not_packable`). The pack's model is :mod:`orca.packed_model`, its optimizer
:mod:`orca.packed_optim`.

``train.compile`` (with ``train.compile_mode``) compiles the pack's training forward once per pack
(:func:`packed_step`): a compilation that a short run alone cannot repay is paid once for all K
runs.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.data import DataLoader

from orca.adapters import build_method
from orca.config import ExperimentConfig, TrainConfig, config_dict, config_yaml
from orca.model import BodyCache, task_shape
from orca.model_state import body_rebuildable, frozen_body_names, load_model_state, model_checkpoint, share_digest
from orca.evaluation import decode, loss_reduction
from orca.optimization import build_optimizer, warmup_linear_decay
from orca.packed_model import PackError, PackedModel
from orca.packed_optim import PackedAdamW, to_device
from orca.runs import CheckpointWriter, RunDir, check_arch, git_info, machine_info
from orca.runtime import autocast_for, resolve_device
from orca.train import (EpochBatchSampler, check_finite, check_steps, compile_for_training, initial_model,
                        uses_cuda_graphs)

#: Methods whose runs can share a packed model (``head`` is LoRA at rank 0 everywhere).
PACKABLE_METHODS = ("lora", "head")
#: Config keys that may differ between the runs of one pack (everything else must agree).
PER_RUN_KEYS = {
    "": ("name", "seed", "run_dir", "output_dir", "align", "rank"),
    "adapter": ("method", "rank", "rank_map", "alpha", "rslora", "init_a", "targets", "clip_rank",
                "loraplus_ratio", "train_embedder", "train_head"),
    "train": ("lr", "weight_decay", "clip_grad", "warmup_epochs", "log_every", "save_every_steps", "num_workers",
              "channels_last"),
    "model": ("embedder_from", "embedder_init"),
}


def why_not_packable(cfg: ExperimentConfig) -> Optional[str]:
    """None if ``cfg`` can train in a pack, else the reason it trains alone (printed by the sweep)."""
    a, t = cfg.adapter, cfg.train
    if a.method not in PACKABLE_METHODS:
        return f"adapter.method={a.method} (packs hold {' and '.join(PACKABLE_METHODS)})"
    if a.dropout:
        return "adapter.dropout > 0 (LoRA dropout masks are not packed)"
    if a.train_norms:
        return "adapter.train_norms (the body's norms are shared by the pack)"
    if t.optimizer != "adamw":
        return f"train.optimizer={t.optimizer} (packs run AdamW)"
    if t.grad_accum != 1:
        return f"train.grad_accum={t.grad_accum} (packs take one micro-batch per step)"
    if t.grad_checkpointing:
        return "train.grad_checkpointing (recomputation would redraw stochastic depth)"
    return None


def pack_key(cfg: ExperimentConfig, progress: Any = None) -> str:
    """What runs of one pack must share: the config without :data:`PER_RUN_KEYS`, plus the point of
    training (``progress``: the ``state`` of ``ckpt/last.pt``) and, for a random body, the seed."""
    data = config_dict(cfg)
    for section, keys in PER_RUN_KEYS.items():
        node = data if not section else data[section]
        for key in keys:
            node.pop(key, None)
    if cfg.model.weights == "none":  # a random body is drawn from the seed: runs of two seeds differ
        data["seed"] = cfg.seed
    data["progress"] = progress
    return json.dumps(data, sort_keys=True, default=str)


def max_rank(cfg: ExperimentConfig) -> int:
    """The rank that decides a run's padding (packs group runs of similar rank)."""
    if cfg.adapter.method == "head":
        return 0
    ranks = [cfg.adapter.rank]
    if isinstance(cfg.adapter.rank_map, dict):
        ranks += [int(r) for r in cfg.adapter.rank_map.values()]
    return max(ranks)


def plan_packs(cfgs: Sequence[ExperimentConfig], k: int) -> Tuple[List[List[int]], List[Tuple[int, str]]]:
    """Split runs into packs of at most ``k``: ``(packs as lists of indices, [(index, why alone)])``.

    Runs pack together when :func:`pack_key` agrees, including where a resumed run stands (read
    from its ``ckpt/last.pt``); inside a group, runs of similar rank share a pack, so a pack pads
    the factors of its low ranks to a nearby rank rather than to the sweep's largest.
    """
    if k < 1:
        raise ValueError(f"pack size must be >= 1, got {k}")
    groups: Dict[str, List[int]] = {}
    alone = []
    for i, cfg in enumerate(cfgs):
        reason = why_not_packable(cfg)
        if reason is not None:
            alone.append((i, reason))
            continue
        progress = None
        if cfg.run_dir and (Path(cfg.run_dir) / "ckpt" / "last.pt").is_file():
            state = torch.load(Path(cfg.run_dir) / "ckpt" / "last.pt", map_location="cpu", weights_only=True,
                               mmap=True)["state"]
            progress = [state["epoch"], state["batch"], state["step"]]
        groups.setdefault(pack_key(cfg, progress), []).append(i)
    packs = []
    for members in groups.values():
        members = sorted(members, key=lambda i: (max_rank(cfgs[i]), i))
        packs.extend(members[j:j + k] for j in range(0, len(members), k))
    return packs, alone


# ----------------------------------------------------------------------------- losses and evaluation
def run_losses(task, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(out, y) -> [K]``: each run's ``task.loss`` over its own rows of a packed batch."""
    loss = task.loss
    if hasattr(loss, "reduction"):
        per_sample = copy.copy(loss)
        per_sample.reduction = "none"
        summed = loss.reduction == "sum"

        def reduced(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            err = per_sample(out, y).view(k, -1)
            return err.sum(1) if summed else err.mean(1)
        return reduced
    return lambda out, y: torch.stack([loss(o, t) for o, t in zip(out.chunk(k), y.chunk(k))])


@torch.no_grad()
def evaluate_pack(model: PackedModel, loader: DataLoader, task, device: torch.device, autocast,
                  desc: str) -> List[Any]:
    """Each run's :func:`orca.train.evaluate` result (or the FloatingPointError it would raise),
    from one pass that feeds every batch to all K runs at once."""
    model.eval()
    k = model.k
    errors, loss_sum, n = [], torch.zeros(k, dtype=torch.float64, device=device), 0
    summed = loss_reduction(task) == "sum"
    losses_of = run_losses(task, k)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        xr, yr = x.repeat(k, *([1] * (x.ndim - 1))), y.repeat(k, *([1] * (y.ndim - 1)))
        with autocast():
            out = model(xr)
        out = out.float()
        errors.append(task.metric(decode(task, out), yr).float().view(k, -1))
        loss_sum += losses_of(out, yr).double() * (1 if summed else len(x))
        n += len(x)
    err = torch.cat(errors, dim=1).cpu()
    loss_sum = loss_sum.cpu()
    results: List[Any] = []
    for i in range(k):
        bad = ~torch.isfinite(err[i])
        if bad.any():
            results.append(FloatingPointError(f"{desc}: non-finite {task.metric_name} on {int(bad.sum())} samples"))
        else:
            results.append({task.metric_name: float(err[i].mean()), "loss": float(loss_sum[i]) / max(n, 1)})
    return results


def train_tensors(dataset, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training set as two device tensors, so a packed batch is one gather, not K loaders.

    Raises:
        PackError: a dataset that augments per sample (its items differ per draw).
    """
    if getattr(dataset, "augment", False):
        raise PackError("the training set augments per sample: its items are not fixed tensors")
    x, y = getattr(dataset, "x", None), getattr(dataset, "y", None)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(dataset)):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        x, y = torch.stack(xs), torch.as_tensor(ys) if not isinstance(ys[0], torch.Tensor) else torch.stack(ys)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- one pack
def step_profiler(path: Optional[str], device: torch.device):
    """A started ``torch.profiler`` over steps 6-10 that writes its operator table to ``path`` (None: off)."""
    if not path:
        return None
    cuda = device.type == "cuda"

    def write(prof) -> None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(wait=3, warmup=2, active=5, repeat=1), on_trace_ready=write)
    prof.start()
    return prof


def packed_step(packed: PackedModel, task, autocast, train: TrainConfig,
                device: torch.device) -> Tuple[Callable[..., torch.Tensor], bool]:
    """The pack's training forward ``(x, y, drop_masks) -> [K] losses`` and whether it replays CUDA graphs.

    With ``train.compile`` it is ``torch.compile``d whole (shared body, segment-wise LoRA, heads,
    losses; its backward follows), so inductor fuses the body's norms, window shuffles and
    elementwise ops over all K runs' rows at once; compiling is paid once per pack, where a run
    alone pays it once per run. ``train.compile_backend=cudagraphs`` instead records the step's
    eager kernels as CUDA graphs: no fusion, but the thousands of small launches of a pack's step
    (the rank segments, per-run heads and embedders) go in one replay, after seconds of capture.

    What keeps it one graph compiled once: the stochastic-depth masks are an input (drawn outside,
    from each run's generator), the compiled step sees full batches only (an epoch's last, smaller
    batch takes the eager forward, as in a compiled run alone, so compiling changes no run's data),
    and evaluation runs the model eagerly (its batches differ in size, and no grad). A pack's model
    and K are its own, so dynamo's cache is reset at the start of every pack: a later or smaller
    last pack compiles afresh rather than piling entries onto one code object until dynamo's
    recompile limit silently leaves it eager.
    """
    losses_of = run_losses(task, packed.k)

    def forward_losses(x: torch.Tensor, y: torch.Tensor, drop_masks: Optional[torch.Tensor]) -> torch.Tensor:
        with autocast():
            out = packed(x, drop_masks)
        return losses_of(out.float(), y)

    if not train.compile:
        return forward_losses, False
    torch._dynamo.reset()
    compiled, full = compile_for_training(forward_losses, train), packed.k * train.batch_size

    def step_losses(x: torch.Tensor, y: torch.Tensor, drop_masks: Optional[torch.Tensor]) -> torch.Tensor:
        return (compiled if len(x) == full else forward_losses)(x, y, drop_masks)
    return step_losses, uses_cuda_graphs(train.compile_mode, train.compile_backend) and device.type == "cuda"


class _Run:
    """One run of a pack: its config, directory, own model (format object), schedule and counters."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.dir = RunDir.create(cfg, "stage3")
        self.error: Optional[str] = None
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": math.inf, "best_epoch": -1,
                      "train_time": 0.0, "train_images": 0,
                      # stage 3 alone's mid-epoch sums (same checkpoint keys); a pack does not fill them yet
                      "epoch_loss": 0.0, "epoch_time": 0.0, "epoch_images": 0}

    @property
    def alive(self) -> bool:
        return self.error is None


def train_pack(cfgs: Sequence[ExperimentConfig], on_step: Optional[Callable[[int], None]] = None,
               log: Callable[[str], None] = lambda msg: print(msg, flush=True),
               profile_to: Optional[str] = None) -> Dict[str, Any]:
    """Train ``cfgs`` as one pack; return ``{"errors": [None or message per run], "timing": {...}}``.

    ``profile_to``: a file for a ``torch.profiler`` table of steps 6-10 (operators by device time),
    where the benchmark's "where the time goes" comes from.

    Raises:
        PackError: the runs cannot share a packed model (nothing was written; train them alone).
    """
    writer = CheckpointWriter()
    try:
        return _train_pack(cfgs, on_step, log, profile_to, writer)
    finally:
        writer.close()  # a failed pack leaves its runs' checkpoints complete, ready to resume


def _train_pack(cfgs: Sequence[ExperimentConfig], on_step: Optional[Callable[[int], None]],
                log: Callable[[str], None], profile_to: Optional[str], writer: CheckpointWriter) -> Dict[str, Any]:
    t0 = time.time()
    timing = {"setup_s": 0.0, "train_s": 0.0, "first_step_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0,
              "checkpoint_wait_s": 0.0, "test_s": 0.0,
              "steps": 0}
    device = resolve_device(cfgs[0].train.device)
    runs = [_Run(cfg) for cfg in cfgs]
    k = len(runs)
    models, methods, params, rng_cpu, rng_dev, resumes = [], [], [], [], [], []
    task, reusable = None, []

    def build_once(make_task):
        """The pack's task, built for the first run and reused when building it drew no random
        numbers (every run alone then builds the same data and leaves the RNG where it found it)."""
        if reusable:
            return reusable[0]
        before = torch.get_rng_state()
        built = make_task()
        if torch.equal(before, torch.get_rng_state()):
            reusable.append(built)
        return built

    bodies = BodyCache(share_tensors=True)  # the runs' frozen bodies are one shared body below
    for run in runs:
        run_task, model = initial_model(run.cfg, build_once, bodies)
        method = build_method(run.cfg.adapter)
        params.append(method.prepare(model))
        rng_cpu.append(torch.get_rng_state())
        rng_dev.append(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        resume = run.dir.load_checkpoint("last")
        if resume is not None:
            check_arch(resume["arch"], model, str(run.dir.ckpt_dir / "last.pt"))
            load_model_state(model, resume, str(run.dir.ckpt_dir / "last.pt"))
        task = task or run_task
        models.append(model)
        methods.append(method)
        resumes.append(resume)
    progress = {json.dumps({key: r["state"][key] for key in ("epoch", "batch", "step")}) if r else None
                for r in resumes}
    if len(progress) > 1:
        raise PackError(f"the runs stand at different points of training ({sorted(map(str, progress))})")
    packed = PackedModel(models).to(device)
    packed.share_frozen(models)
    for model in models:
        model.to(device)
    rebuildable = [body_rebuildable(r.cfg.model.weights, m) for r, m in zip(runs, methods)]
    share_digest(models, [frozen_body_names(m, ok) for m, ok in zip(models, rebuildable)])
    if task.decode is not None:
        task.decode.to(device)
    x_train, y_train = train_tensors(task.train, device)

    t = cfgs[0].train
    check_steps(cfgs[0], len(task.train))
    autocast = autocast_for(t.amp, device)
    step_losses, graphs = packed_step(packed, task, autocast, t, device)
    samplers = [EpochBatchSampler(len(task.train), t.batch_size, r.cfg.seed) for r in runs]
    micro_per_epoch = len(samplers[0])
    if t.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, t.max_steps_per_epoch)
    total_steps = micro_per_epoch * t.epochs
    optimizers, schedulers = [], []
    for run, model, method in zip(runs, models, methods):
        groups = method.param_groups(model, run.cfg.train.lr, run.cfg.train.weight_decay)
        optimizers.append(build_optimizer(run.cfg, groups, device))
        warmup = round(run.cfg.train.warmup_epochs * micro_per_epoch)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizers[-1], warmup_linear_decay(total_steps, warmup)))
        optimizers[-1]._opt_called = True  # PackedAdamW steps for it: no "scheduler before optimizer" warning
    generators = []
    for i, (run, resume) in enumerate(zip(runs, resumes)):
        if resume is not None:
            optimizers[i].load_state_dict(resume["optimizer"])
            schedulers[i].load_state_dict(resume["scheduler"])
            methods[i].load_state(resume.get("method", {}))
            run.state.update(resume["state"])
            rng_cpu[i] = resume["rng_cpu"]
            if device.type == "cuda" and "rng_cuda" in resume:
                rng_dev[i] = resume["rng_cuda"]
        gen = torch.Generator(device=device)
        gen.set_state(rng_dev[i] if device.type == "cuda" else rng_cpu[i])
        generators.append(gen)
        methods[i].on_train_start(models[i], total_steps)
        covered = dict(run.state)  # as in stage 3 alone: config and running summary once all was read
        run.dir.begin(config_yaml(run.cfg), {
            "stage": "stage3", "task": run.cfg.task.name, "experiment": run.cfg.name, "seed": run.cfg.seed,
            "method": run.cfg.adapter.method, "epochs": run.cfg.train.epochs, "run_dir": str(run.dir.path)},
            keep=None if resume is None else (
                lambda r, c=covered: (r.get("kind") == "train" and r["step"] <= c["step"])
                or (r.get("kind") == "epoch" and r["epoch"] <= c["epoch"])))
        log(f"[pack] run directory: {run.dir.path} ({run.cfg.adapter.method}, "
            f"{params[i]['trainable']:,} trainable parameters)")
    packed.generators[:] = generators
    adamw = PackedAdamW(packed.slots, optimizers, models, [r.cfg.train.clip_grad for r in runs])
    adamw.load()
    eval_loader = lambda ds: DataLoader(ds, batch_size=t.batch_size * 2, shuffle=False,  # noqa: E731
                                        num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                        generator=torch.Generator().manual_seed(cfgs[0].seed))
    val_loader, test_loader = eval_loader(task.val), eval_loader(task.test)
    metric = task.metric_name
    timing["setup_s"] = time.time() - t0
    log(f"[pack] {k} runs share one {cfgs[0].model.body} on {device}; "
        f"LoRA on {len(packed.lora_names)} Linears, ranks padded to "
        f"{max([p.lora_A.shape[1] for p in packed.body.modules() if hasattr(p, 'ranks')] or [0])}")

    def fail(i: int, err: BaseException) -> None:
        runs[i].error = f"{type(err).__name__}: {err}"
        log(f"[pack] FAILED {runs[i].dir.path.name}: {runs[i].error} (the other runs go on)")

    # what a run's checkpoints hold of its model besides the stacks' tensors never changes in a
    # pack (shared frozen body and buffers; a pack trains nothing else): taken once per run
    fixed = [{**model_checkpoint(m, ok), "arch": m.arch(), "task_shape": task_shape(task)}
             for m, ok in zip(models, rebuildable)]

    def model_payload(i: int) -> Dict[str, Any]:
        """Run i's model part of a checkpoint, its trained tensors read straight from the stacks."""
        return {**fixed[i], "model": {**fixed[i]["model"], **packed.run_tensors(i)}}

    def checkpoint(best: Sequence[int] = ()) -> None:
        """``ckpt/best.pt`` of the runs ``best`` and ``ckpt/last.pt`` of every live run, written in
        the background from one snapshot of all of them (:meth:`CheckpointWriter.save_many`)."""
        tc = time.time()
        items = [(runs[i].dir, "best", {**model_payload(i), "epoch": runs[i].state["best_epoch"],
                                        f"val_{metric}": runs[i].state["best"]}) for i in best]
        for i, run in enumerate(runs):
            if not run.alive:
                continue
            payload = {**model_payload(i), "optimizer": adamw.export(i),
                       "scheduler": schedulers[i].state_dict(), "state": dict(run.state),
                       "method": methods[i].state_for_checkpoint(),
                       "rng_cpu": generators[i].get_state() if device.type == "cpu" else rng_cpu[i],
                       "config": config_dict(run.cfg)}
            if device.type == "cuda":
                payload["rng_cuda"] = generators[i].get_state()
            items.append((run.dir, "last", payload))
        writer.save_many(items)
        timing["checkpoint_s"] += time.time() - tc

    profiler = step_profiler(profile_to, device)
    start = runs[0].state
    for epoch in range(start["epoch"], t.epochs):
        packed.train()
        for sampler in samplers:
            sampler.set_epoch(epoch, skip_batches=start["batch"])
        batches = [iter(s) for s in samplers]
        t_epoch, images, loss_acc = time.time(), 0, torch.zeros(k, device=device)
        for micro in range(start["batch"], micro_per_epoch):
            index = [next(b) for b in batches]
            idx = to_device(torch.tensor([j for part in index for j in part]), device)
            x, y = x_train[idx], y_train[idx]
            drop_masks = packed.draw_drop_masks(len(index[0]), device)  # outside any compiled graph
            if graphs:  # a new step: the previous step's graph outputs may now be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            losses = step_losses(x, y, drop_masks)
            losses.sum().backward()
            images += len(index[0])
            loss_acc += losses.detach()
            adamw.clip_grad_norm_()
            adamw.step()
            adamw.zero_grad()
            for sched in schedulers:
                sched.step()
            for run in runs:
                run.state["step"] += 1
                run.state["batch"] = micro + 1
            step = start["step"]
            timing["steps"] += 1
            if timing["steps"] == 1:  # the first step holds the compilation, with train.compile
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timing["first_step_s"] = time.time() - t_epoch
                log(f"[pack] first step {timing['first_step_s']:.1f} s"
                    + (" (with its compilation)" if t.compile else ""))
            logging = [i for i, r in enumerate(runs) if r.alive and step % r.cfg.train.log_every == 0]
            if logging:
                host = losses.detach().cpu()
                for i in logging:
                    try:
                        check_finite(host[i], epoch, step)
                    except FloatingPointError as err:
                        fail(i, err)
                        continue
                    runs[i].dir.log_metrics({"kind": "train", "epoch": epoch + 1, "step": step,
                                             "train/loss": float(host[i]), "train/lr": schedulers[i].get_last_lr()[0]})
            saving = [r for r in runs if r.alive and r.cfg.train.save_every_steps
                      and step % r.cfg.train.save_every_steps == 0]
            if saving:
                now = time.time()
                for run in runs:
                    run.state["train_time"] += now - t_epoch
                    run.state["train_images"] += images
                t_epoch, images = now, 0
                checkpoint()
            if not any(r.alive for r in runs):
                break
            if on_step is not None:
                on_step(step)
            if profiler is not None:
                profiler.step()
        host = loss_acc.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing["train_s"] += time.time() - t_epoch
        for i, run in enumerate(runs):
            if run.alive:
                try:
                    check_finite(host[i], epoch, run.state["step"])
                except FloatingPointError as err:
                    fail(i, err)
            run.state["train_time"] += time.time() - t_epoch
            run.state["train_images"] += images
        records = [{"kind": "epoch", "epoch": epoch + 1, "step": run.state["step"],
                    "train/loss": float(host[i]) / max(1, micro_per_epoch - samplers[i].skip),
                    "train/img_per_s": images / max(time.time() - t_epoch, 1e-9) if images else None}
                   for i, run in enumerate(runs)]
        improved: List[int] = []  # live runs whose validation improved: their best checkpoints
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            te = time.time()
            vals = evaluate_pack(packed, val_loader, task, device, autocast, desc="val")
            timing["eval_s"] += time.time() - te
            for i, (run, val) in enumerate(zip(runs, vals)):
                if not run.alive:
                    continue
                if isinstance(val, BaseException):
                    fail(i, val)
                    continue
                records[i].update({f"val/{key}": v for key, v in val.items()})
                if val[metric] < run.state["best"]:
                    run.state["best"], run.state["best_epoch"] = val[metric], epoch + 1
                    improved.append(i)
        for run, record in zip(runs, records):
            if run.alive:
                run.dir.log_metrics(record)
            run.state["epoch"], run.state["batch"] = epoch + 1, 0
        checkpoint(best=improved)
        alive = [r for r in runs if r.alive]
        if alive and "val/" + metric in records[runs.index(alive[0])]:
            log(f"[pack] epoch {epoch + 1}/{t.epochs}: val {metric} "
                + ", ".join(f"{records[i]['val/' + metric]:.4g}" for i, r in enumerate(runs) if r.alive))
        if not alive:
            break

    if profiler is not None:
        profiler.stop()
    tc = time.time()
    writer.wait()  # the best checkpoints are read back below
    timing["checkpoint_s"] += time.time() - tc
    timing["checkpoint_wait_s"] = writer.wait_s  # of checkpoint_s: waiting for the writer thread
    tt = time.time()
    for i, run in enumerate(runs):
        best = run.dir.load_checkpoint("best") if run.alive else None
        if best is not None:
            load_model_state(models[i], best, str(run.dir.ckpt_dir / "best.pt"))
            packed.load_from_runs(models, only=i)
    tests = evaluate_pack(packed, test_loader, task, device, autocast, desc="test") if any(r.alive for r in runs) else []
    timing["test_s"] = time.time() - tt
    timing["wall_s"] = time.time() - t0
    if device.type == "cuda":
        timing["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    code, machine = git_info(), machine_info()  # the pack's runs share both: asked once, not per run
    for i, run in enumerate(runs):
        if not run.alive:
            continue
        test = tests[i]
        if isinstance(test, BaseException):
            fail(i, test)
            continue
        state = run.state
        run.dir.log_metrics({"kind": "test", "epoch": state["best_epoch"], "step": state["step"],
                             **{f"test/{key}": v for key, v in test.items()}})
        summary = {
            "stage": "stage3", "task": run.cfg.task.name, "experiment": run.cfg.name, "seed": run.cfg.seed,
            "method": run.cfg.adapter.method, "body": run.cfg.model.body, "weights": models[i].weights_source,
            "metric": metric, "val": {metric: state["best"]}, "test": test, "best_epoch": state["best_epoch"],
            "epochs": run.cfg.train.epochs, "steps": state["step"], "params": params[i],
            "train_img_per_s": state["train_images"] / max(state["train_time"], 1e-9),
            "world_size": 1, "packed_runs": k,
            "wall_time_s": time.time() - t0, "git": code, "machine": machine,
            "data": task.info, "command": " ".join(sys.argv), "run_dir": str(run.dir.path),
        }
        report = methods[i].report()
        if report:
            summary["adapter_report"] = report
        run.dir.write_summary(summary)
        run.dir.close()
        log(f"[pack] {run.dir.path.name}: test {metric} = {test[metric]:.5g} (best val epoch {state['best_epoch']})")
    for run in runs:
        run.dir.close()
    steps = max(timing["steps"], 1)
    log(f"[pack] {k} runs in {timing['wall_s']:.1f} s: setup {timing['setup_s']:.1f} s, "
        f"{timing['steps']} steps {timing['train_s']:.1f} s (the first {timing['first_step_s']:.1f} s, "
        f"{1000 * (timing['train_s'] - timing['first_step_s']) / max(steps - 1, 1):.1f} ms per later step), "
        f"eval {timing['eval_s']:.1f} s, checkpoints {timing['checkpoint_s']:.1f} s "
        f"({timing['checkpoint_wait_s']:.1f} s of it waiting for writes), test {timing['test_s']:.1f} s")
    return {"errors": [r.error for r in runs], "timing": timing, "runs": [str(r.dir.path) for r in runs]}
