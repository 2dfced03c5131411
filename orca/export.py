"""``python -m orca export RUN_DIR``: a finished stage-3 run's weights in a format other code can load.

    python -m orca export runs/stage3__darcy__... --format peft      # HF peft adapter of the body
    python -m orca export runs/stage3__darcy__... --format merged    # one plain state dict, no orca code
    python -m orca export runs/stage3__darcy__... --format adapter --checkpoint last --out my_adapter

Formats (``orca.adapters.io`` writes them; this module only rebuilds the run's model):

- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` of the body's LoRA layers, loaded
  by ``peft.PeftModel.from_pretrained(body, DIR)`` on the unadapted timm body (its patch embedding
  replaced by ``nn.Identity()``), plus ``embedder_head.safetensors``: the trained embedder and head,
  which peft's adapter format has no place for and without which the body's outputs mean nothing.
- ``merged``: ``model.safetensors``, the whole model with every adapter folded in (W0 + s B A, NF4
  dequantised); its ``body.*`` tensors load into the plain timm body, ``embedder.*`` / ``head.*``
  into :class:`orca.model.ORCAModel`'s parts. The only format for Delta-LoRA and full fine-tuning.
- ``adapter``: orca's own ``adapter.safetensors`` + ``adapter.json`` (``orca.adapters.io.load_adapter``).

Every export also writes ``export.json``: the run, checkpoint, body and weights it came from.

Why the model is rebuilt without ``model.embedder_from``: the checkpoint holds the embedder, so the
export needs no stage-1 directory that may have moved since training. The body's weights are loaded
only where the checkpoint left its frozen body out (:mod:`orca.model_state`: the file or hub weights
the config names, checked against the checkpoint's digest); a checkpoint with the whole model needs
neither the hub nor the weights file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from orca.adapters import build_method
from orca.adapters.io import export_merged, export_peft, save_adapter
from orca.config import load_config
from orca.errors import OrcaError, UsageError, reading
from orca.model import build_model
from orca.model_state import FROZEN_KEY, load_model_state
from orca.runs import check_arch, CheckpointMismatch, write_json

FORMATS = ("peft", "merged", "adapter")
CHECKPOINTS = ("best", "last")
NO_ADAPTERS = ("full", "head")  # methods that leave no adapter to export (merged still works)


def _read_checkpoint(path: Path) -> dict:
    other = "last" if path.stem == "best" else "best"
    with reading(path, "a checkpoint (truncated, or not a torch file)", f"export the other one (--checkpoint {other})"):
        return torch.load(path, map_location="cpu", weights_only=True)


def _task_facts(cfg, saved: dict):
    if "task_shape" in saved:
        return SimpleNamespace(**saved["task_shape"])
    from datasets.registry import build_task  # a checkpoint from before task_shape was recorded

    return build_task(cfg.task.name, cfg.task.options, cfg.task.data_root)


def export_run(run_dir: str | Path, fmt: str, out: Optional[str | Path] = None, checkpoint: str = "best") -> Path:
    """Export stage-3 run ``run_dir``'s ``ckpt/{checkpoint}.pt`` as ``fmt``; return the output directory.

    Args:
        run_dir: a stage-3 run directory (``config.yaml`` and ``ckpt/``).
        fmt: one of :data:`FORMATS`.
        out: output directory (default ``RUN_DIR/export/{fmt}-{checkpoint}``).
        checkpoint: ``best`` (by validation; what the run's test metric was measured on) or ``last``.

    Raises:
        UsageError: an unknown format or checkpoint name, a directory that is not a stage-3 run, a run
            without adapters asked for an adapter format.
        OrcaError: a damaged checkpoint, one that does not fit the run's config, a method whose
            weights the format cannot hold (Delta-LoRA in peft's format).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}", "--format", f"choose one of {', '.join(FORMATS)}")
    if checkpoint not in CHECKPOINTS:
        raise UsageError(f"unknown checkpoint {checkpoint!r}", "--checkpoint", f"choose one of {', '.join(CHECKPOINTS)}")
    run = Path(run_dir)
    config = run / "config.yaml"
    if not config.is_file():
        raise UsageError("not a run directory (no config.yaml)", str(run), "pass a stage-3 run directory")
    cfg = load_config(str(config))
    ckpt = run / "ckpt" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        other = next((c for c in CHECKPOINTS if c != checkpoint and (run / "ckpt" / f"{c}.pt").is_file()), None)
        fix = (f"export --checkpoint {other}" if other else "pass a stage-3 run directory that trained at least one epoch")
        raise UsageError(f"no ckpt/{checkpoint}.pt (not a stage-3 run, or it has not finished an epoch)", str(run), fix)
    method_name = cfg.adapter.method
    if method_name in NO_ADAPTERS and fmt != "merged":
        raise UsageError(f"the run trained with adapter.method={method_name}, which has no adapters to export as "
                         f"{fmt!r}", str(config), "export it with --format merged")
    if method_name == "delta_lora" and fmt == "peft":
        raise UsageError("Delta-LoRA changes the base weights, which peft's adapter format cannot hold", str(config),
                         "export it with --format merged")
    if method_name == "adalora" and fmt != "adapter":
        raise UsageError(f"AdaLoRA's SVD adapters have no {fmt!r} export", str(config), "export it with --format adapter")

    saved = _read_checkpoint(ckpt)
    # A checkpoint without its frozen body (orca.model_state) needs the body the config names; a
    # whole one overwrites every tensor, so a random body spares loading the weights.
    weights = cfg.model.weights if FROZEN_KEY in saved else "none"
    rebuild = dataclasses.replace(cfg.model, weights=weights, embedder_from=None)
    torch.manual_seed(cfg.seed)
    model = build_model(rebuild, _task_facts(cfg, saved))
    method = build_method(cfg.adapter)
    method.prepare(model)
    try:
        check_arch(saved["arch"], model, str(ckpt))
    except CheckpointMismatch as err:
        raise OrcaError(str(err), str(config), "was config.yaml edited after training? export with the config "
                                               "the run trained with") from None
    try:
        load_model_state(model, saved, str(ckpt))
    except CheckpointMismatch as err:
        raise OrcaError(str(err), str(config), "export with the body file the run trained with") from None
    model.eval()

    out = Path(out) if out is not None else run / "export" / f"{fmt}-{checkpoint}"
    with method.eval_rank(model):  # DyLoRA: the rank the run was evaluated at
        if fmt == "peft":
            export_peft(model.body, out, cfg.adapter)
            from safetensors.torch import save_file

            parts = {f"{name}.{k}": v.detach().contiguous().cpu() for name in ("embedder", "head")
                     for k, v in getattr(model, name).state_dict().items()}
            save_file(parts, str(out / "embedder_head.safetensors"), metadata={"format": "orca-embedder-head"})
        elif fmt == "merged":
            export_merged(model, out / "model.safetensors")
        else:
            save_adapter(model, out, method)
    write_json(out / "export.json", {
        "format": fmt, "run_dir": str(run), "checkpoint": str(ckpt),
        "epoch": saved.get("epoch", saved.get("state", {}).get("epoch")), "method": method_name,
        "body": cfg.model.body, "body_kwargs": dict(cfg.model.body_kwargs), "weights": cfg.model.weights,
        "img_size": cfg.model.img_size,
    })
    return out


def describe(out: Path) -> str:
    """The files an export wrote, for the command's last line."""
    return ", ".join(sorted(p.name for p in Path(out).iterdir()))
