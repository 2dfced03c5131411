"""Stage 3: fine-tune the ORCA model with any registered adapter method, one loop for all.

Why this file is long: it is stage 3 read top to bottom (setup, the loop, evaluation on the
best checkpoint, resume, DDP), one loop for every method; what the other stages share with it lives
in orca.runtime, orca.optimization and orca.evaluation.

    python -m orca stage3 --config configs/darcy_tiny.yaml train.epochs=3
    bash scripts/stage3.sh configs/darcy_swinb.yaml adapter.method=lora adapter.rank=8
    python -m orca stage3 --resume runs/stage3__darcy__...     # continue an interrupted run

The loop knows nothing about which method runs: the method freezes and injects in ``prepare``,
shapes the optimizer's parameter groups (LoRA+), and gets ``on_step_start`` / ``on_step_end``
calls (DyLoRA's rank sampling, Delta-LoRA's weight update). Data order is a pure function of
(seed, epoch), and checkpoints hold the RNG states, so a run killed mid-epoch and resumed from its
last checkpoint reproduces the uninterrupted run on CPU with ``train.deterministic=true``.

Several GPUs (DistributedDataParallel, one process per GPU; ``train.batch_size`` stays the global batch):

    torchrun --standalone --nproc_per_node=2 -m orca stage3 --config configs/darcy_swinb.yaml

Each rank takes its contiguous slice of every global batch, so the data order and the steps match
the single-GPU run; gradients are averaged over ranks. All ranks draw from the same RNG streams
(same seed): per-step random choices of a method (DyLoRA's rank) must agree across ranks, and
dropout masks falling on different samples are harmless. Rank 0 alone prints, writes the run
directory and checkpoints, and evaluates on the whole validation / test set (they are small next to
training; the others wait at a barrier), so metrics are computed exactly as on one GPU.

Fast path (GPU): ``train.compile=true`` (``train.compile_mode``), ``train.channels_last=true``;
``train.grad_checkpointing=[0, 1, "2:6"]`` trades compute for activation memory in body stages 0
and 1 and the first 6 blocks of stage 2 (``orca/checkpointing.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from datasets.progress import Progress
from datasets.registry import TaskData, build_task
from orca.adapters import build_method
from orca.checkpointing import set_checkpointing, summary as checkpointing_summary
from orca.config import ExperimentConfig, TrainConfig, config_dict, config_yaml
from orca.delta_w import DELTA_W_FILE, DELTA_W_METHODS, body_linear_weights, write_delta_w
from orca.distributed import Dist, setup_distributed
from orca.errors import UsageError
from orca.evaluation import evaluate, loss_reduction
from orca.model import BodyCache, ORCAModel, build_model, task_shape
from orca.model_state import body_rebuildable, load_model_state, model_checkpoint
from orca.optimization import build_optimizer, warmup_linear_decay
from orca.provenance import check_embedder_from, check_rank_map
from orca.runs import RunDir, check_arch, git_info, machine_info
from orca.runtime import autocast_for, resolve_device, seed_everything
from orca.schema import ConfigError
from orca.warmup import load_warmup


class EpochBatchSampler(Sampler[List[int]]):
    """Shuffled batches whose order depends only on (seed, epoch), resumable at any batch.

    Under DDP every rank builds the same global batches and keeps its contiguous slice of each, so
    the union over ranks of step ``t`` is exactly the single-process batch ``t``.

    Args:
        n: dataset length.
        batch_size: samples per global batch.
        seed: base seed; epoch ``e`` uses ``seed * 100003 + e``.
        rank, world: this process's slice of each global batch (``batch_size % world == 0``).
            The last, smaller batch is kept, unless ``world`` does not divide its size: an uneven
            split would weigh samples unequally in the averaged gradient. (A compiled step runs it
            eagerly: compiling changes no run's data.)
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by world size {world}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def _global_batches(self) -> int:
        tail = self.n % self.batch_size
        keep_tail = tail and tail % self.world == 0
        return self.n // self.batch_size + (1 if keep_tail else 0)

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for i in range(self.skip, self._global_batches()):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return self._global_batches() - self.skip


def check_steps(cfg: ExperimentConfig, n_train: int, world: int = 1) -> None:
    """Refuse a run that would take no optimizer step: it would "finish", untrained, with a test metric.

    Raises:
        ConfigError: fewer micro-batches per epoch than ``train.grad_accum``, naming the sizes.
    """
    micro = len(EpochBatchSampler(n_train, cfg.train.batch_size, cfg.seed, world=world))
    if cfg.train.max_steps_per_epoch:
        micro = min(micro, cfg.train.max_steps_per_epoch * cfg.train.grad_accum)
    if micro < cfg.train.grad_accum:
        raise ConfigError(f"this run would take no optimizer step: {n_train} training samples make {micro} "
                          f"batches of {cfg.train.batch_size} per epoch, fewer than "
                          f"train.grad_accum={cfg.train.grad_accum}", "train.batch_size",
                          "lower train.batch_size or train.grad_accum, or train on more samples")


# ----------------------------------------------------------------------------- the stage
def initial_model(cfg: ExperimentConfig, main_first: Optional[Callable[[Callable[[], Any]], Any]] = None,
                  bodies: Optional[BodyCache] = None) -> Tuple[TaskData, ORCAModel]:
    """The task and the model stage 3 starts from: ``seed_everything(cfg.seed)`` -> ``build_task`` ->
    ``build_model`` (-> the warm-up's embedder and head when ``model.warmup_from`` is set), in that
    order (the one place it is written down; runs alone and packed runs both start here).

    Random initialisations (embedder, head, a body with ``model.weights=none``) draw from the RNG
    after the task is built, so this order and seed reproduce a run's initial weights W_0 exactly
    from its ``config.yaml``: stage 3 builds its model with it, and ``scripts/hypothesis.py``
    rebuilds W_0 with it.

    Args:
        cfg: the experiment config.
        main_first: how ``build_task`` is run (stage 3 passes ``Dist.main_first``, so rank 0 writes
            data caches before the others read them); None = just call it.
        bodies: bodies built before in this process (packed runs; :class:`orca.model.BodyCache`).
    """
    seed_everything(cfg.seed, cfg.train.deterministic)
    make_task = lambda: build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)  # noqa: E731
    task = main_first(make_task) if main_first is not None else make_task()
    model = build_model(cfg.model, task, bodies)
    if cfg.model.warmup_from:  # here, so that every way of training a run (alone or packed) starts from it
        load_warmup(model, cfg.model.warmup_from, config_dict(cfg)["task"], cfg.seed)
    return task, model


def run_stage3(cfg: ExperimentConfig, run: Optional[RunDir] = None,
               on_step: Optional[Callable[[int], None]] = None) -> RunDir:
    """Fine-tune, validate every epoch, test the best-by-validation checkpoint; return the run directory.

    Methods that train the body's weights (``full``, ``delta_lora``) also leave ``delta_w.json.gz``, the
    spectra of the tested weights' update (:func:`orca.delta_w.write_delta_w`), after ``summary.json``.

    Args:
        cfg: the resolved experiment config.
        run: an existing run directory to resume into (default: ``RunDir.create(cfg, "stage3")``,
            which resumes too when ``cfg.run_dir`` holds ``ckpt/last.pt``).
        on_step: called with the optimizer step count after every step (tests use it to simulate a kill).
    """
    done = finished_run(cfg, run)
    if done is not None:
        return done
    dist_, device = setup_distributed(cfg.train.batch_size, resolve_device(cfg.train.device))
    began: Dict[str, Any] = {}  # filled once the run directory has changed (rank 0)
    try:
        return _run_stage3(cfg, run, on_step, dist_, device, began)
    except BaseException as err:  # the run began: its summary says it failed, and why
        if began:
            began["run"].record_failure(err, began["facts"]())
        raise
    finally:
        dist_.close()


def finished_run(cfg: ExperimentConfig, run: Optional[RunDir]) -> Optional[RunDir]:
    """The run directory, when it holds a run that finished ``cfg.train.epochs`` epochs (else None).

    Resuming such a run is a no-op that says so: it writes nothing (its summary and test row stay).
    A larger ``train.epochs`` trains on from its last checkpoint instead.
    """
    path = run.path if run is not None else (Path(cfg.run_dir) if cfg.run_dir else None)
    if path is None or not (path / "summary.json").is_file():
        return None
    run = run if run is not None else RunDir(path)
    summary = run.finished()
    if summary is None:
        return None
    differ = config_differences(path / "config.yaml", cfg, ignore=("run_dir", "train.epochs"))
    if differ:
        raise UsageError(f"run_dir holds a finished run of another config ({'; '.join(differ[:3])}"
                         + (f"; {len(differ) - 3} more" if len(differ) > 3 else "") + ")", f"run_dir={path}",
                         "choose another run_dir, or resume the run with its own config.yaml")
    if int(summary.get("epochs", 0)) < cfg.train.epochs:
        return None
    metric = summary.get("metric")
    test = summary.get("test", {}).get(metric) if metric else None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[stage3] {path} is a finished run ({summary.get('epochs')} epochs"
              + (f", test {metric} {test:.5g}" if isinstance(test, (int, float)) else "")
              + f"): nothing to do, nothing written; to train longer, resume it with a larger train.epochs",
              flush=True)
    return run


def config_differences(saved: Path, cfg: ExperimentConfig, ignore=()) -> List[str]:
    """``key: A there, B here`` for every setting of ``cfg`` that differs from the config file ``saved``
    (settings the file does not have, added to the code since it was written, do not count)."""
    def flat(node: Any, prefix: str = "") -> Dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}

    # in today's keys: a run begun before a key moved compares its setting, not a missing key
    there = flat(cfg.upgrade(yaml.safe_load(saved.read_text()) or {})) if saved.is_file() else {}
    here = flat(yaml.safe_load(config_yaml(cfg)))
    return [f"{k}: {there[k]!r} there, {v!r} here" for k, v in here.items()
            if k not in ignore and k in there and there[k] != v]  # a key newer than the file: its default


def _run_stage3(cfg: ExperimentConfig, run: Optional[RunDir], on_step: Optional[Callable[[int], None]],
                dist_: Dist, device: torch.device, began: Dict[str, Any]) -> RunDir:
    t0 = time.time()
    main = dist_.main
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    autocast = autocast_for(cfg.train.amp, device)
    task, model = initial_model(cfg, dist_.main_first)
    check_steps(cfg, len(task.train), dist_.world)
    # W_0 of the body's Linears, for delta_w.json.gz at the end (rank 0; methods that train W only).
    w0 = body_linear_weights(model) if main and cfg.adapter.method in DELTA_W_METHODS else None
    if set_checkpointing(model.body, cfg.train.grad_checkpointing) is not None:
        log(f"[stage3] activation checkpointing: {checkpointing_summary(model.body)}")
    method = build_method(cfg.adapter)
    params = method.prepare(model)
    rebuildable = body_rebuildable(cfg.model.weights, method)  # checkpoints then leave the frozen body out
    model.to(device)
    if task.decode is not None:
        task.decode.to(device)
    if cfg.train.channels_last:
        model.embedder.to(memory_format=torch.channels_last)

    check_embedder_from(cfg, model.weights_source)  # products of another task, body or embedder: nothing written
    check_rank_map(cfg, model.weights_source)
    if run is None:
        path = dist_.broadcast(str(RunDir.create(cfg, "stage3").path) if main else None)
        run = RunDir(path)
    resume = run.load_checkpoint("last")  # read before anything in the directory is touched
    if resume is not None:
        check_arch(resume["arch"], model, str(run.ckpt_dir / "last.pt"))
    log(f"[stage3] run directory: {run.path}")
    log(f"[stage3] body weights: {model.weights_source}; method: {cfg.adapter.method}"
        + (f"; {dist_.world} processes, {cfg.train.batch_size // dist_.world} samples each per step" if dist_.world > 1 else ""))
    if main:
        print_params(params)

    groups = method.param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    optimizer = build_optimizer(cfg, groups, device)
    train_sampler = EpochBatchSampler(len(task.train), cfg.train.batch_size, cfg.seed, rank=dist_.rank,
                                      world=dist_.world)
    # Own generator: a DataLoader iterator otherwise draws its base seed from the global RNG at
    # every epoch start, which would shift dropout / drop-path randomness after a mid-epoch resume.
    pin = device.type == "cuda"
    workers = cfg.train.num_workers
    train_loader = DataLoader(task.train, batch_sampler=train_sampler, num_workers=workers, pin_memory=pin,
                              persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = lambda ds: DataLoader(ds, batch_size=cfg.train.batch_size * 2, shuffle=False,  # noqa: E731
                                        num_workers=workers, pin_memory=pin,
                                        generator=torch.Generator().manual_seed(cfg.seed))
    val_loader, test_loader = eval_loader(task.val), eval_loader(task.test)

    micro_per_epoch = len(train_sampler)
    if cfg.train.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, cfg.train.max_steps_per_epoch * cfg.train.grad_accum)
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(total_steps, round(cfg.train.warmup_epochs * steps_per_epoch)))

    # epoch_*: the current epoch's running sums up to the last checkpoint, so that a resumed epoch logs
    # the loss and img/s of the whole epoch, as an uninterrupted run does.
    state = {"epoch": 0, "batch": 0, "step": 0, "best": math.inf, "best_epoch": -1,
             "train_time": 0.0, "train_images": 0, "epoch_loss": 0.0, "epoch_time": 0.0, "epoch_images": 0}
    if resume is not None:  # every rank loads the same checkpoint, so ranks stay identical
        load_model_state(model, resume, str(run.ckpt_dir / "last.pt"))
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        method.load_state(resume.get("method", {}))
        state.update(resume["state"])
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resume:
            torch.cuda.set_rng_state(resume["rng_cuda"])
        log(f"[stage3] resumed at epoch {state['epoch']} batch {state['batch']} (step {state['step']})")
    dist_.barrier()  # every rank has read and loaded the checkpoint before rank 0 writes anything
    facts = {"stage": "stage3", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed,
             "method": cfg.adapter.method, "epochs": cfg.train.epochs, "run_dir": str(run.path)}
    if main:  # the resume is known good: only now does the directory change
        covered = dict(state)
        run.begin(config_yaml(cfg), facts, keep=None if resume is None else (
            lambda r: (r.get("kind") == "train" and r["step"] <= covered["step"])
            or (r.get("kind") == "epoch" and r["epoch"] <= covered["epoch"])))
        began["run"], began["facts"] = run, lambda: {**facts, "epoch": state["epoch"], "step": state["step"],
                                                     "wall_time_s": time.time() - t0, "git": git_info()}

    method.on_train_start(model, total_steps)  # after load_state: a resumed method keeps its own
    # The compiled step takes full batches only: static shapes, one compilation (or CUDA graph). An
    # epoch's last, smaller batch goes through the same model uncompiled, so compiling changes the
    # speed of a run, not its data.
    eager_model = wrap_for_training(model, cfg, dist_, device)
    train_model = compile_for_training(eager_model, cfg.train) if cfg.train.compile else eager_model
    full_micro = cfg.train.batch_size // dist_.world
    # DDP averages gradients over ranks. That is the full-batch gradient for a per-batch mean loss,
    # but half of it for a per-batch *sum* (ORCA's Darcy loss): scale sums by the world size.
    summed = loss_reduction(task) == "sum"
    rescale = summed and dist_.world > 1
    graphs = (cfg.train.compile and uses_cuda_graphs(cfg.train.compile_mode, cfg.train.compile_backend)
              and device.type == "cuda")

    def global_loss(value: torch.Tensor) -> torch.Tensor:
        """The whole global batch's loss (sum or mean as the task defines it); a collective under DDP."""
        if dist_.world == 1:
            return value.detach()
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total if summed else total / dist_.world

    def checkpoint(name: str = "last") -> None:
        if not main:
            return
        payload = {**model_checkpoint(model, rebuildable), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "state": dict(state), "arch": model.arch(), "task_shape": shape,
                   "method": method.state_for_checkpoint(), "rng_cpu": torch.get_rng_state(),
                   "config": config_dict(cfg)}
        if device.type == "cuda":
            payload["rng_cuda"] = torch.cuda.get_rng_state()
        run.save_checkpoint(name, payload)

    metric = task.metric_name
    shape = task_shape(task)  # in every checkpoint: `orca export` rebuilds the model without the data
    for epoch in range(state["epoch"], cfg.train.epochs):
        model.train()
        train_sampler.set_epoch(epoch, skip_batches=state["batch"])
        with Progress(total=micro_per_epoch, initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                      unit="batch", enabled=main) as bar:
            # Losses accumulate on the device and are read back only at log steps: a host sync per
            # step stalls the kernel queue, which dominates small-batch steps (ORCA's batch 4).
            t_epoch, images, loss_acc = time.time(), 0, torch.zeros((), device=device)
            for micro, (x, y) in enumerate(train_loader, start=state["batch"]):
                if micro >= micro_per_epoch:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if micro % cfg.train.grad_accum == 0:
                    method.on_step_start(model, state["step"])
                last_micro = (micro + 1) % cfg.train.grad_accum == 0
                # DDP all-reduces at every backward unless told otherwise: accumulate locally first.
                sync = contextlib.nullcontext() if last_micro or dist_.world == 1 else train_model.no_sync()
                if graphs:  # a new step: the previous step's graph outputs may now be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with sync:
                    with autocast():
                        out = (train_model if len(x) == full_micro else eager_model)(x)
                    loss = task.loss(out.float(), y)
                    reg = method.regularization(model)
                    scaled = loss * dist_.world if rescale else loss
                    ((scaled if reg is None else scaled + reg) / cfg.train.grad_accum).backward()
                images += len(x) * dist_.world
                loss_acc += loss.detach()
                bar.update(1)
                if not last_micro:
                    continue
                if cfg.train.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                method.on_step_end(model, state["step"])
                state["step"] += 1
                state["batch"] = micro + 1
                if state["step"] % cfg.train.log_every == 0:
                    step_loss = global_loss(loss)
                    check_finite(step_loss, epoch, state["step"])
                    if main:
                        bar.set_postfix(loss=f"{step_loss.item():.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        run.log_metrics({"kind": "train", "epoch": epoch + 1, "step": state["step"],
                                         "train/loss": float(step_loss), "train/lr": scheduler.get_last_lr()[0]})
                if cfg.train.save_every_steps and state["step"] % cfg.train.save_every_steps == 0:
                    segment = global_loss(loss_acc)  # the sums so far go into the checkpoint (a collective)
                    check_finite(segment, epoch, state["step"])
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.time() - t_epoch
                    state["epoch_loss"] += float(segment)
                    state["epoch_time"] += seconds
                    state["epoch_images"] += images
                    state["train_time"] += seconds
                    state["train_images"] += images
                    loss_acc.zero_()
                    checkpoint()
                    t_epoch, images = time.time(), 0  # saving is not training: img/s leaves it out
                if on_step is not None:
                    on_step(state["step"])
        loss_acc = global_loss(loss_acc)
        check_finite(loss_acc, epoch, state["step"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t_epoch
        state["train_time"] += seconds
        state["train_images"] += images
        epoch_images, epoch_time = state["epoch_images"] + images, state["epoch_time"] + seconds
        record = {"kind": "epoch", "epoch": epoch + 1, "step": state["step"],
                  "train/loss": (state["epoch_loss"] + float(loss_acc)) / max(1, micro_per_epoch),
                  "train/img_per_s": epoch_images / max(epoch_time, 1e-9) if epoch_images else None}
        if main and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
            with method.eval_rank(model):
                val = evaluate(model, val_loader, task, device, autocast, desc="val")
            record.update({f"val/{k}": v for k, v in val.items()})
            if val[metric] < state["best"]:
                state["best"], state["best_epoch"] = val[metric], epoch + 1
                run.save_checkpoint("best", {**model_checkpoint(model, rebuildable), "arch": model.arch(), "task_shape": shape,
                                             "epoch": epoch + 1, f"val_{metric}": val[metric]})
            log(f"[stage3] epoch {epoch + 1}: train loss {record['train/loss']:.4g}, "
                f"val {metric} {val[metric]:.4g} (best {state['best']:.4g} @ {state['best_epoch']})")
        if main:
            run.log_metrics(record)
        state.update(epoch=epoch + 1, batch=0, epoch_loss=0.0, epoch_time=0.0, epoch_images=0)
        checkpoint()
        dist_.barrier()  # the others wait out rank 0's evaluation and checkpoint

    if not main:
        return run
    best = run.load_checkpoint("best")
    if best is not None:
        load_model_state(model, best, str(run.ckpt_dir / "best.pt"))
    with method.eval_rank(model):
        test = evaluate(model, test_loader, task, device, autocast, desc="test")
    run.log_metrics({"kind": "test", "epoch": state["best_epoch"], "step": state["step"],
                     **{f"test/{k}": v for k, v in test.items()}})
    summary = {
        "stage": "stage3", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed,
        "method": cfg.adapter.method, "body": cfg.model.body, "weights": model.weights_source,
        "metric": metric, "val": {metric: state["best"]}, "test": test, "best_epoch": state["best_epoch"],
        "epochs": cfg.train.epochs, "steps": state["step"], "params": params,
        "train_img_per_s": state["train_images"] / max(state["train_time"], 1e-9),
        "world_size": dist_.world,
        "wall_time_s": time.time() - t0, "git": git_info(), "machine": machine_info(),
        "data": task.info, "command": " ".join(sys.argv), "run_dir": str(run.path),
    }
    report = method.report()
    if report:
        summary["adapter_report"] = report
    path = run.write_summary(summary)
    if w0 is not None:  # after the summary: a failure here costs delta_w.json.gz only
        try:
            write_delta_w(run, model, w0, cfg, tested=f"ckpt/best.pt (epoch {best['epoch']}, the weights tested)"
                          if best is not None else "the final weights (no ckpt/best.pt; the weights tested)",
                          resumed=resume is not None, log=log)
        except Exception as err:  # noqa: BLE001 - any failure: report it, keep the finished run
            traceback.print_exc()
            log(f"[stage3] WARNING: {DELTA_W_FILE} was NOT written ({type(err).__name__}: {err}); "
                f"summary.json and the checkpoints are complete")
    run.close()
    print(f"[stage3] test {metric} = {test[metric]:.5g} (best val epoch {state['best_epoch']}); summary: {path}", flush=True)
    return run


def wrap_for_training(model: torch.nn.Module, cfg: ExperimentConfig, dist_: Dist,
                      device: torch.device) -> torch.nn.Module:
    """The module the training step calls: DDP-wrapped under torchrun (stage 3 then compiles it if
    asked, :func:`compile_for_training`).

    DDP sees only parameters that require grad, so frozen body weights get neither gradient buffers
    nor all-reduce traffic. Buffers (Swin's attention masks and position indices, QLoRA's quantised
    weights) are constant and identical on every rank, so they are not re-broadcast each forward.
    Compiling the DDP module (rather than the reverse) lets dynamo split graphs at bucket boundaries
    so the all-reduce overlaps the backward.
    """
    train_model = model
    if dist_.world > 1:
        # torch >= 2.14 renames broadcast_buffers; syncing the (identical) buffers once at init is harmless.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=False, gradient_as_bucket_view=True, **no_sync)
    return train_model


def compile_for_training(fn: Callable, train: TrainConfig) -> Callable:
    """``torch.compile(fn)`` with ``train.compile_mode`` and ``train.compile_backend``: the one place
    a training step (a run alone's or a pack's) is compiled."""
    mode = None if train.compile_mode == "default" else train.compile_mode
    return torch.compile(fn, mode=mode, backend=train.compile_backend)


def uses_cuda_graphs(compile_mode: Optional[str], backend: str = "inductor") -> bool:
    """Whether torch.compile with ``compile_mode`` and ``backend`` records CUDA graphs: the
    cudagraphs backend always; inductor in the modes torch itself defines so (reduce-overhead and
    max-autotune). Such a graph's outputs are overwritten by its next replay, so a training loop
    marks where each step begins, and its memory pool is taken at capture, so peak-memory readings
    after warm-up count the pool, not the step."""
    from torch._inductor import list_mode_options

    if backend == "cudagraphs":
        return True
    return bool(list_mode_options(compile_mode or "default").get("triton.cudagraphs", False))


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop a diverged run with advice instead of training on NaNs."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, step {step}: "
                                 f"lower train.lr or set train.clip_grad")


def print_params(params: Dict[str, Any]) -> None:
    """One line of trainable-parameter accounting (orca.adapters.count_parameters) per run."""
    parts = ", ".join(f"{k} {params[k]:,}" for k in ("embedder", "head", "adapters", "other"))
    print(f"[stage3] trainable parameters: {params['trainable']:,} ({parts}); body {params['body']:,}, "
          f"{100 * params['body_fraction']:.3f}% of it trained", flush=True)
