"""Stage 0: supervised pretraining of a (reduced) Swin body on FractalDB-style classes, in a time budget.

    bash scripts/stage0_pretrain.sh configs/stage0_fractal.yaml                  # 480 s of budget
    bash scripts/stage0_pretrain.sh configs/stage0_fractal.yaml pretrain.time_budget_s=240
    bash scripts/stage0_pretrain.sh --export results/checkpoints/fractal_swin.safetensors \\
        configs/stage0_fractal.yaml output_dir=results/runs                      # the committed body
    python -m orca stage0 --config configs/stage0_fractal.yaml train.device=cpu ...
    python -m orca.pretrain export RUN_DIR results/checkpoints/fractal_swin.safetensors

Why stage 0 exists: ORCA's body is an ImageNet-21k Swin from the hub, which an air-gapped machine
cannot fetch. Fractal classes (Kataoka et al., ACCV 2020) pretrain a body with no download at all;
the run writes ``body.safetensors`` with the exact timm config in its header, so
``model.weights=file`` (configs/body_fractal.yaml) loads it in stages 1-3 and refuses a file made for
another variant.

Why a time budget rather than epochs: a body is worth the compute spent on it, and a budget fixes
that compute directly, on any machine, where an epoch count's cost depends on the throughput. The
learning rate follows ORCA's warm-up + linear decay over the run's *progress*, the larger of
steps/max_steps and elapsed/training-window, so it reaches zero exactly when the budget ends,
whatever the throughput. The budget counts from the start of the stage (rendering and compilation
included); the final validation and save are reserved out of it.

Why the data lives on the GPU as uint8: the generator renders ~4-9k images/s on an H100, about what
the body trains on, so rendering on the fly would halve training throughput. A fixed instance set
(150 kB per 224 px image) rendered once, then randomly cropped and flipped per batch on the GPU,
costs ~20-40 s of the budget and never stalls the training loop.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets.images import normalize_uint8, random_resized_crop_flip
from datasets.progress import Progress, interval_s
from datasets.registry import TaskData, build_task
from orca.bodies import create_body, read_body_meta, save_body
from orca.config import ExperimentConfig, config_yaml
from orca.errors import OrcaError, UsageError, exit_on_error
from orca.evaluation import evaluate
from orca.model import body_from_config
from orca.optimization import build_optimizer, warmup_linear_decay
from orca.runs import RunDir, atomic_write_bytes, git_info, machine_info, write_json
from orca.runtime import autocast_for, resolve_device, seed_everything
from orca.schema import ConfigError
from orca.adapters.optim import build_param_groups
from orca.checkpointing import set_checkpointing
from orca.masked_pretraining import MaskedImageModel, masked_l1, random_block_mask

BODY_FILE = "body.safetensors"
LOG_FILE = "stage0.log"
SCHEDULE_TICKS = 10_000  # resolution of the progress-based learning-rate schedule
GPU_RENDER_BATCH = 512  # instances per chaos-game batch on CUDA (~1.5 GB at 224 px, 100k points)
MAX_DATA_FRACTION = 0.6  # of free GPU memory the resident image set may take (the rest trains)


class StageLog:
    """Print a line and append it to the run directory's log (tqdm bars stay on the terminal)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[stage0] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")


# ----------------------------------------------------------------------------- data
class ResidentImages:
    """A classification split held as uint8 images on the training device.

    Args:
        images: ``[N, 3, H, W]`` uint8.
        labels: ``[N]`` int64 (same device).
        augment: random resized crop + flip of every batch (training split).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: Optional[torch.Tensor] = None, drop_last: bool = False,
                generator: Optional[torch.Generator] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(x [B, 3, H, W] float32 normalised, y [B])`` in ``order`` (default: stored order)."""
        order = torch.arange(len(self)) if order is None else order
        order = order.to(self.images.device)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for s in range(0, stop, batch_size):
            sel = order[s:s + batch_size]
            x = self.images[sel].float()
            if self.augment:
                x = random_resized_crop_flip(x, generator=generator)
            yield normalize_uint8(x), self.labels[sel]


def load_split(dataset, device: torch.device, workers: int, log: StageLog, name: str) -> Optional[ResidentImages]:
    """Render a generated split (one with ``render_uint8``) onto ``device``; None for file-backed sets."""
    if not hasattr(dataset, "render_uint8"):
        return None
    n = len(dataset)
    x0, _ = dataset.render_uint8([0], device="cpu")
    need = n * x0[0].numel()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > MAX_DATA_FRACTION * free:
            raise RuntimeError(f"the {name} split needs {need / 2**30:.1f} GiB of GPU memory as uint8, more than "
                               f"{MAX_DATA_FRACTION:.0%} of the {free / 2**30:.1f} GiB free; lower "
                               f"task.options.train_per_class or num_classes, or model/task image_size")
    t = time.time()
    with Progress(total=n, desc=f"render {name}", unit="img") as bar:
        images, labels = dataset.render_uint8(
            range(n), device=device, batch_size=GPU_RENDER_BATCH if device.type == "cuda" else None,
            workers=workers, progress=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t
    log(f"rendered {name}: {n} images {tuple(images.shape[1:])} ({need / 2**30:.2f} GiB uint8) in {dt:.1f} s "
        f"({n / max(dt, 1e-9):.0f} img/s)")
    return ResidentImages(images, labels, augment=getattr(dataset, "augment", False))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Shuffled item order of ``epoch``: a function of (seed, epoch) only, as in stage 3."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def decay_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, never on biases, norms or position-bias tables."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return build_param_groups(model.named_parameters(), lr, weight_decay, no_decay=lambda name, p: (
        p.ndim <= 1 or name in skip or "relative_position_bias_table" in name))


# ----------------------------------------------------------------------------- the stage
def check_stage0_inputs(cfg: ExperimentConfig, task: TaskData) -> Tuple[int, Optional[float], float]:
    """Refuse what stage 0 cannot train; return (classes, time budget, label smoothing)."""
    if task.kind != "classification":
        raise ConfigError(f"stage 0 pretrains a classifier, but task.name={cfg.task.name!r} is a {task.kind} task; "
                          f"use task.name=fractal (or another classification task)")
    classes = int(task.out_shape[0])
    if classes < 2:
        raise ConfigError(f"stage 0 needs at least 2 classes, task {cfg.task.name!r} has {classes}; "
                          f"raise task.options.num_classes")
    budget = cfg.pretrain.time_budget_s
    if budget is not None and not budget > 0:
        raise ConfigError(f"pretrain.time_budget_s must be > 0 seconds (or null for no budget), got {budget!r}")
    smoothing = float(cfg.pretrain.label_smoothing or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"pretrain.label_smoothing must be in [0, 1), got {smoothing!r}")
    return classes, budget, smoothing


def run_stage0(cfg: ExperimentConfig) -> RunDir:
    """Pretrain ``cfg.model.body`` on ``cfg.task`` and save ``body.safetensors``; return the run directory.

    A run that stops on an error after its directory began says so in ``summary.json`` (``status: failed``).

    Raises:
        ConfigError: a non-classification task, fewer than 2 classes, a bad time budget.
        WeightsError: ``model.weights=file`` with a missing file or one of another Swin variant.
        RuntimeError: the time budget is spent before training starts; the data does not fit the GPU.
    """
    began: Dict[str, Any] = {}  # filled once the run directory has begun
    try:
        return _run_stage0(cfg, began)
    except BaseException as err:
        if began:
            began["run"].record_failure(err, began["facts"])
        raise


def _run_stage0(cfg: ExperimentConfig, began: Dict[str, Any]) -> RunDir:
    t0 = time.time()
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    autocast = autocast_for(cfg.train.amp, device)
    task = build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)
    classes, budget, smoothing = check_stage0_inputs(cfg, task)
    body = body_from_config(cfg.model)
    init_weights = body.orca_weights
    body.reset_classifier(classes)  # timm's pooled Linear head; save_body drops it ("head.*")
    set_checkpointing(body, cfg.train.grad_checkpointing)
    mim_weight = float(cfg.pretrain.mim_weight)
    # What trains: the body (+ its classifier), and with SimMIM also a mask token and a decoder.
    trained = MaskedImageModel(body, cfg.model.img_size, cfg.pretrain.mim_mask_patch) if mim_weight > 0 else body
    trained.to(device)

    run = RunDir.create(cfg, "stage0")
    facts = {"stage": "stage0", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed,
             "body": cfg.model.body, "run_dir": str(run.path)}
    run.begin(config_yaml(cfg), facts)
    began.update(run=run, facts=facts)
    log = StageLog(run.file(LOG_FILE))
    n_params = sum(p.numel() for n, p in body.named_parameters() if not n.startswith("head."))
    log(f"run directory: {run.path}")
    log(f"body {cfg.model.body} {cfg.model.body_kwargs} @ {cfg.model.img_size}px: {n_params:,} parameters "
        f"(+ head {classes} classes); init: {init_weights}; device {device}"
        + (f"; time budget {budget:g} s" if budget else ""))
    if mim_weight > 0:
        log(f"objective: cross entropy + {mim_weight:g} x SimMIM masked-pixel L1 ({cfg.pretrain.mim_mask_ratio:.0%} of "
            f"{cfg.pretrain.mim_mask_patch} px blocks masked, one forward for both)")

    # --- data: generated splits live on the device, file-backed ones go through a DataLoader
    t_data = time.time()
    train_res = load_split(task.train, device, cfg.train.num_workers, log, "train")
    val_res = load_split(task.val, device, cfg.train.num_workers, log, "val")
    render_s = time.time() - t_data
    n_train, bs, accum = len(task.train), cfg.train.batch_size, cfg.train.grad_accum
    if n_train < bs:
        raise ConfigError(f"train.batch_size={bs} exceeds the {n_train} training images (batches are full-size)")
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def train_epoch(epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(n_train, cfg.seed, epoch)
        if train_res is not None:
            return train_res.batches(bs, order, drop_last=True, generator=aug_gen)
        return iter(DataLoader(task.train, batch_size=bs, sampler=order.tolist(), drop_last=True,
                               num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda"))

    def val_batches():
        if val_res is not None:
            return val_res.batches(bs * 2)
        return DataLoader(task.val, batch_size=bs * 2, num_workers=cfg.train.num_workers)

    def validate(tag: str) -> Dict[str, float]:
        out = evaluate(body, val_batches(), task, device, autocast, desc=f"val {tag}")
        body.train()
        return {"val/acc": 1.0 - out[task.metric_name], "val/error": out[task.metric_name], "val/loss": out["loss"]}

    # --- optimisation: AdamW, progress-based warm-up + linear decay (see the module docstring)
    optimizer = build_optimizer(cfg, decay_groups(trained, cfg.train.lr, cfg.train.weight_decay), device)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    micro_per_epoch = n_train // bs
    if cfg.train.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, cfg.train.max_steps_per_epoch * accum)
    steps_per_epoch = max(1, micro_per_epoch // accum)
    micro_per_epoch = steps_per_epoch * accum
    max_steps = steps_per_epoch * cfg.train.epochs
    schedule = warmup_linear_decay(SCHEDULE_TICKS, round(SCHEDULE_TICKS * cfg.train.warmup_epochs / cfg.train.epochs))
    train_model = torch.compile(trained) if cfg.train.compile else trained
    parts: Dict[str, torch.Tensor] = {}  # the loss terms of the last micro-batch (logged, never synced early)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if mim_weight == 0:
            with autocast():
                logits = train_model(x)
            return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        mask = random_block_mask(len(x), trained.grid, cfg.pretrain.mim_mask_ratio, x.device)
        with autocast():
            logits, reconstruction = train_model(x, mask)
        parts["ce"] = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        parts["mim"] = masked_l1(reconstruction, x, trained.pixel_mask(mask))
        return parts["ce"] + mim_weight * parts["mim"]

    compile_s, compiled = 0.0, cfg.train.compile
    if compiled:  # compile forward and backward before the clock that paces the schedule starts
        t = time.time()
        x, y = next(train_epoch(0))
        try:
            loss_of(x.to(device), y.to(device)).backward()
        except Exception as err:  # noqa: BLE001 -- inductor fails in many ways; a budgeted run goes on eagerly
            log(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); training without it")
            train_model, compiled = trained, False
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s = time.time() - t
        log(f"torch.compile warm-up: {compile_s:.1f} s")
    t = time.time()
    start_val = validate("start")
    eval_s = time.time() - t
    run.log_metrics({"kind": "eval", "epoch": 0, "step": 0, "images_seen": 0, **start_val})
    log(f"val top-1 before training: {start_val['val/acc']:.4f} (chance {1 / classes:.4f}); eval took {eval_s:.1f} s")

    t_train0 = time.time()
    window = None
    if budget:
        reserve = 1.5 * eval_s + 5.0  # the final validation, the save and the summary
        window = t0 + budget - reserve - t_train0
        if window <= 0:
            raise RuntimeError(
                f"pretrain.time_budget_s={budget:g} is spent before training starts: setup took {t_train0 - t0:.0f} s "
                f"(render {render_s:.0f} s, compile {compile_s:.0f} s, validation {eval_s:.0f} s) and "
                f"{reserve:.0f} s are kept for the final validation; raise the budget, "
                + ("set train.compile=false" if compile_s > render_s else
                   "shrink the data (task.options.num_classes, train_per_class)"))
        log(f"training window: {window:.0f} s (setup {t_train0 - t0:.0f} s, reserve {reserve:.0f} s)")

    def progress(step: int) -> float:
        p = step / max_steps
        return max(p, (time.time() - t_train0) / window) if window else p

    state = {"step": 0, "images": 0, "epochs": 0.0, "eval_time": 0.0}
    stop, done, last_loss, history = "epochs", False, float("nan"), []
    # a bar on a terminal; the progress lines are the log's own (every ORCA_PROGRESS_S, also in LOG_FILE)
    bar = Progress(total=100, desc="stage0", unit="%", lines=False)
    every_s = interval_s()
    t_log, img_log, t_print = time.time(), 0, time.time()
    for epoch in range(cfg.train.epochs):
        body.train()
        optimizer.zero_grad(set_to_none=True)
        for micro, (x, y) in enumerate(train_epoch(epoch)):
            if micro >= micro_per_epoch:
                break
            if micro % accum == 0:
                p = progress(state["step"])
                if p >= 1.0:
                    stop, done = ("time_budget" if window and state["step"] < max_steps else "epochs"), True
                    break
                factor = schedule(min(SCHEDULE_TICKS - 1, int(p * SCHEDULE_TICKS)))
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_of(x, y)
            (loss / accum).backward()
            state["images"] += len(x)
            state["epochs"] += len(x) / n_train
            img_log += len(x)
            if (micro + 1) % accum:
                continue
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.train.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if state["step"] % cfg.train.log_every:
                continue
            last_loss = float(loss.detach())  # the loop's only host sync
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"non-finite training loss at step {state['step']}: lower train.lr "
                                         f"or set train.clip_grad")
            now = time.time()
            rate, t_log, img_log = img_log / max(now - t_log, 1e-9), now, 0
            lr = optimizer.param_groups[0]["lr"]
            history.append(last_loss)
            terms = {f"train/{k}": float(v.detach()) for k, v in parts.items()}
            run.log_metrics({"kind": "train", "epoch": round(state["epochs"], 4), "step": state["step"],
                             "images_seen": state["images"], "train/loss": last_loss, **terms, "train/lr": lr,
                             "train/img_per_s": rate, "elapsed_s": now - t0})
            p = min(1.0, progress(state["step"]))
            bar.update(round(100 * p, 1) - bar.n)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", ep=f"{state['epochs']:.2f}")
            if every_s and now - t_print >= every_s:  # the log's progress lines
                t_print = now
                log(f"{100 * p:.0f}%: step {state['step']}, epoch {state['epochs']:.2f}, loss {last_loss:.4f}"
                    + "".join(f" ({k.split('/')[1]} {v:.4f})" for k, v in terms.items()) + ", "
                    f"lr {lr:.2e}, {rate:.0f} img/s, elapsed {now - t0:.0f} s")
        if done:
            break
        if (epoch + 1) % cfg.train.eval_every == 0 and epoch + 1 < cfg.train.epochs and progress(state["step"]) < 1:
            t = time.time()
            val = validate(f"epoch {epoch + 1}")
            state["eval_time"] += time.time() - t
            run.log_metrics({"kind": "eval", "epoch": epoch + 1, "step": state["step"],
                             "images_seen": state["images"], **val})
            log(f"epoch {epoch + 1}: step {state['step']}, loss {last_loss:.4f}, val top-1 {val['val/acc']:.4f}")
            t_log, img_log = time.time(), 0  # the rate window must not include the validation
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.time() - t_train0

    final = validate("final")
    run.log_metrics({"kind": "eval", "epoch": round(state["epochs"], 4), "step": state["step"],
                     "images_seen": state["images"], **final})
    ckpt = run.file(BODY_FILE)
    body_cfg = dict(cfg.model.body_kwargs, img_size=cfg.model.img_size)
    save_body(body, cfg.model.body, body_cfg, str(ckpt))
    verify_body_file(ckpt, body)
    summary = {
        "stage": "stage0", "task": cfg.task.name, "experiment": cfg.name, "seed": cfg.seed,
        "body": cfg.model.body, "body_kwargs": cfg.model.body_kwargs, "img_size": cfg.model.img_size,
        "init_weights": init_weights, "body_params": n_params, "classes": classes,
        "train_images": n_train, "val_images": len(task.val),
        "val": {"top1": final["val/acc"], "loss": final["val/loss"], "top1_before": start_val["val/acc"],
                "chance": 1.0 / classes},
        "steps": state["step"], "images_seen": state["images"], "epochs_seen": state["epochs"],
        "stopped_by": stop, "time_budget_s": budget,
        "train_img_per_s": state["images"] / max(train_s - state["eval_time"], 1e-9),
        "time_s": {"render": render_s, "compile": compile_s, "train": train_s, "evals_in_train": state["eval_time"]},
        "wall_time_s": time.time() - t0,
        "first_last_logged_loss": [history[0], history[-1]] if history else None,
        "last_loss_terms": {k: float(v.detach()) for k, v in parts.items()} or None,
        "optim": {"batch_size": bs, "grad_accum": accum, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                  "warmup_fraction": cfg.train.warmup_epochs / cfg.train.epochs, "label_smoothing": smoothing,
                  "mim": ({"weight": mim_weight, "mask_ratio": cfg.pretrain.mim_mask_ratio,
                           "mask_patch": cfg.pretrain.mim_mask_patch} if mim_weight > 0 else None),
                  "compile": compiled, "amp": cfg.train.amp},
        "checkpoint": file_facts(ckpt), "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                                            if device.type == "cuda" else None),
        "git": git_info(), "machine": machine_info(), "data": task.info, "command": " ".join(sys.argv),
        "run_dir": str(run.path),
    }
    run.write_summary(summary)
    run.close()
    log(f"val top-1 {final['val/acc']:.4f} after {state['images']:,} images ({state['epochs']:.2f} epochs, "
        f"{state['step']} steps, stopped by {stop}); {summary['train_img_per_s']:.0f} img/s; "
        f"wall {summary['wall_time_s']:.0f} s; body: {ckpt} ({summary['checkpoint']['bytes'] / 2**20:.1f} MiB)")
    return run


# ----------------------------------------------------------------------------- the checkpoint
def file_facts(path: Path) -> Dict[str, Any]:
    """Path, size and sha256 of a file (the summary's record of the checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def load_saved_body(path: Path) -> torch.nn.Module:
    """The body in ``path`` rebuilt from the timm config in its header, as stages 1-3 load it."""
    meta = read_body_meta(Path(path))
    if meta is None:
        raise OrcaError("the weights file has no orca_body header", str(path),
                        "give a body.safetensors written by stage 0 (python -m orca stage0)")
    kwargs = dict(meta["kwargs"])
    img_size = kwargs.pop("img_size", 224)
    return create_body(meta["model"], weights="file", weights_file=str(path), img_size=img_size, **kwargs)


def verify_body_file(path: Path, body: Optional[torch.nn.Module] = None) -> None:
    """Reload ``path`` like stages 1-3 do; with ``body``, require bit-identical tensors."""
    loaded = load_saved_body(path).state_dict()
    if body is None:
        return
    own = {k: v for k, v in body.state_dict().items() if not k.startswith("head.")}
    bad = [k for k in own if k not in loaded or not torch.equal(own[k].detach().cpu(), loaded[k])]
    if bad:
        raise RuntimeError(f"{path} does not reload to the trained body: {len(bad)} tensors differ, e.g. {bad[0]}")


def export_checkpoint(run_dir: str, dest: str) -> Path:
    """Copy a finished run's body to ``dest`` (e.g. results/checkpoints/), check it loads, note it in the summary."""
    src = Path(run_dir) / BODY_FILE
    if not src.is_file():
        raise UsageError(f"no {BODY_FILE} in the run directory", run_dir, "give a finished stage-0 run directory")
    out = Path(dest)
    atomic_write_bytes(out, lambda tmp: shutil.copyfile(src, tmp))
    verify_body_file(out)
    facts = file_facts(out)
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["exported_checkpoint"] = facts
        write_json(summary_path, summary)
    print(f"[stage0] exported {src} -> {out} ({facts['bytes'] / 2**20:.1f} MiB, sha256 {facts['sha256'][:12]})")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m orca.pretrain export``: a user mistake ends in one ``error:`` line, not a traceback."""
    return exit_on_error(_main, argv)


def _main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m orca.pretrain", description="stage-0 checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="copy RUN_DIR/body.safetensors to DEST and check that it loads")
    exp.add_argument("run_dir")
    exp.add_argument("dest")
    args = parser.parse_args(argv)
    export_checkpoint(args.run_dir, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
