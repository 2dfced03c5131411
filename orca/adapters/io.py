"""Saving and loading adapters, merged export, and export to HF peft's on-disk LoRA format.

Three formats, for three uses:

- :func:`save_adapter` / :func:`load_adapter`: the trainable state only (``adapter.safetensors``)
  plus ``adapter.json`` (method, per-module ranks, alpha, targets, the full config), a few MB
  instead of Swin-B's 350. Names are relative to the module passed, so pass the whole model to
  keep the embedder and head, or the body for the adapters alone. Delta-LoRA changes W, so its
  adapted base weights are saved too.
- :func:`export_merged`: a plain state dict (W0 + s B A, NF4 dequantised) that loads into the
  unadapted model with ``load_state_dict`` and needs no orca code.
- :func:`export_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` as HF peft writes
  them, so ``peft.PeftModel.from_pretrained(timm_body, path)`` rebuilds the same function. peft is
  not imported here; the format is checked against peft in the tests.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from orca.adapters.base import AdapterMethod, build_method, is_adapter_param
from orca.adapters.config import AdapterConfig
from orca.adapters.dylora import DynamicRank
from orca.adapters.lora import LoRALinear, lora_layers
from orca.errors import READ_ERRORS, FileReadError, UsageError, reading

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
FORMAT = "orca-adapter"
FORMAT_VERSION = 1

PathLike = Union[str, Path]


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu()


def adapter_state_dict(module: nn.Module, method: str) -> Dict[str, torch.Tensor]:
    """Trainable tensors of ``module`` and, for Delta-LoRA, the adapted layers' base weights."""
    state = {n: _plain(p) for n, p in module.named_parameters() if p.requires_grad or is_adapter_param(n)}
    if method == "delta_lora":
        for name, layer in lora_layers(module).items():
            state[f"{name}.base_layer.weight"] = _plain(layer.base_layer.weight)
    return state


def save_adapter(module: nn.Module, directory: PathLike, method: AdapterMethod) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``directory``.

    Args:
        module: the model (or its body) that ``method`` prepared; tensor names are relative to it.
        directory: created if missing.
        method: the prepared method. The saved config's ``rank_map`` is the resolved, complete
            per-module map (zeros included), so loading rebuilds exactly these modules without
            stage 2's file.
    """
    cfg = method.cfg
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = _body_prefix(module)
    ranks = {name[len(prefix):]: layer.r for name, layer in lora_layers(module).items()}
    saved_cfg = cfg.to_dict()
    resolved = getattr(method, "ranks", None)
    if resolved:
        saved_cfg["rank_map"] = dict(resolved)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "method": cfg.method, "ranks": ranks,
        "alpha": cfg.alpha, "rslora": cfg.rslora, "targets": cfg.targets, "body_prefix": prefix,
        "config": saved_cfg,
    }
    save_file(adapter_state_dict(module, cfg.method), str(directory / ADAPTER_WEIGHTS),
              metadata={"format": FORMAT})
    (directory / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def _body_prefix(module: nn.Module) -> str:
    """``"body."`` when given the whole model (rank-map names are relative to the body)."""
    return "body." if isinstance(getattr(module, "body", None), nn.Module) else ""


def read_adapter_config(directory: PathLike) -> AdapterConfig:
    """The :class:`AdapterConfig` saved with an adapter."""
    meta = _read_meta(directory)
    return AdapterConfig.from_dict(meta["config"])


def _read_meta(directory: PathLike) -> Dict[str, Any]:
    path = Path(directory) / ADAPTER_JSON
    if not path.is_file():
        raise UsageError(f"no {ADAPTER_JSON} there, so it is not a saved orca adapter", str(directory),
                         "give a directory that save_adapter wrote")
    with reading(path, "an adapter's metadata", "save the adapter again"):
        meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise FileReadError(f"format {found!r}, expected {FORMAT!r} v{FORMAT_VERSION}", str(path),
                            "save the adapter again with this version")
    return meta


def load_adapter(model: Any, directory: PathLike, method: Optional[AdapterMethod] = None) -> AdapterMethod:
    """Load a saved adapter into ``model``.

    Args:
        model: the same kind of object that was saved (whole model or body).
        directory: written by :func:`save_adapter`.
        method: the method that already prepared ``model``; if None, the saved config is built
            and prepares ``model`` first (which then must be unadapted).

    Returns:
        The method (to keep training or to evaluate, e.g. DyLoRA's ``eval_rank``).

    Raises:
        ValueError: a module whose rank or tensor shape differs from the saved one, or a saved
            tensor with no counterpart in ``model``; each names the module.
    """
    meta = _read_meta(directory)
    module = model
    prefix = _body_prefix(module)
    if prefix != meta.get("body_prefix", ""):
        raise ValueError(f"adapter in {str(directory)!r} was saved from "
                         f"{'a whole model' if meta.get('body_prefix') else 'a body'}; pass the same")
    if method is None:
        method = build_method(AdapterConfig.from_dict(meta["config"]))
        if meta.get("body_prefix"):
            method.prepare(model)
        else:
            method.prepare_body(model)
    elif method.cfg.method != meta["method"]:
        raise ValueError(f"adapter in {str(directory)!r} was saved by method {meta['method']!r}, "
                         f"not {method.cfg.method!r}")
    have = {n[len(prefix):]: layer.r for n, layer in lora_layers(module).items()}
    for name, r in have.items():  # model order, so the first error is the shallowest module
        if name in meta["ranks"] and meta["ranks"][name] != r:
            raise ValueError(f"module {name!r}: saved rank {meta['ranks'][name]}, model rank {r}")
    missing = [n for n in meta["ranks"] if n not in have]
    if missing:
        raise ValueError(f"saved adapter module {missing[0]!r} (rank {meta['ranks'][missing[0]]}) is "
                         f"not adapted in this model ({len(missing)} such modules)")
    extra = [n for n in have if n not in meta["ranks"]]
    if extra:
        raise ValueError(f"model adapts module {extra[0]!r}, which the saved adapter lacks "
                         f"({len(extra)} such modules)")
    with reading(Path(directory) / ADAPTER_WEIGHTS, "an adapter's weights", "save the adapter again",
                 READ_ERRORS + (SafetensorError,)):
        tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    params = dict(module.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"saved tensor {unknown[0]!r} has no counterpart in the model")
    pairs = [(name, target, tensors[name]) for name, target in params.items() if name in tensors]
    for name, target, value in pairs:  # check everything before changing anything
        if target.shape != value.shape:
            owner, leaf = name.rsplit(".", 1)
            raise ValueError(f"module {owner!r}: saved {leaf} has shape {tuple(value.shape)}, "
                             f"the model's has {tuple(target.shape)}")
    with torch.no_grad():
        for _, target, value in pairs:
            target.copy_(value.to(target.dtype))
    return method


def merged_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of ``module`` as if never adapted: W0 + s B A folded in, NF4 dequantised, and
    every key that of the plain model (no ``base_layer.``, no ``lora_*``, no quantisation state)."""
    state = module.state_dict()
    replaced: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            bias = m.base_layer.bias
            replaced[name] = {"weight": m.merged_weight(),
                              **({"bias": bias.detach()} if bias is not None else {})}
        elif type(getattr(m, "weight", None)).__name__ == "Params4bit" and not _inside(name, replaced):
            from orca.adapters.qlora import NF4Weight

            replaced[name] = {"weight": NF4Weight.get(m).float(),
                              **({"bias": m.bias.detach()} if m.bias is not None else {})}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not _inside(key, replaced):
            out[key] = value
    for name, tensors in replaced.items():
        for leaf, value in tensors.items():
            out[f"{name}.{leaf}" if name else leaf] = value
    return out


def _inside(key: str, names) -> bool:
    return any(key.startswith(n + ".") for n in names)


def export_merged(module: nn.Module, path: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Write :func:`merged_state_dict` to a safetensors file (optionally cast to ``dtype``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: _plain(v if dtype is None or not v.is_floating_point() else v.to(dtype))
             for k, v in merged_state_dict(module).items()}
    save_file(state, str(path), metadata={"format": "orca-merged"})
    return path


def export_peft(body: nn.Module, directory: PathLike, cfg: AdapterConfig) -> Path:
    """Export the body's LoRA layers in HF peft's format (``PeftModel.from_pretrained(body, dir)``).

    Per-module ranks go to peft's ``rank_pattern`` (escaped exact names, so no suffix matches
    another module); DyLoRA exports its current rank b (A[:b], B[:, :b], scaling alpha / b).

    Raises:
        ValueError: Delta-LoRA (its updated W has no place in peft's adapter format: use
            :func:`export_merged`), or a body without LoRA layers.
    """
    if cfg.method == "delta_lora":
        raise ValueError("Delta-LoRA modifies the base weights, which peft's LoRA adapter format "
                         "cannot hold; use export_merged for a Delta-LoRA model")
    layers = lora_layers(body)
    if not layers:
        raise ValueError("export_peft: the module holds no LoRA layers (pass the adapted body)")
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"export_peft: adapter {name!r} is merged; unmerge before exporting")
        r = layer.variant.b if isinstance(layer.variant, DynamicRank) else layer.r
        tensors[f"base_model.model.{name}.lora_A.weight"] = _plain(layer.lora_A[:r])
        tensors[f"base_model.model.{name}.lora_B.weight"] = _plain(layer.lora_B[:, :r])
        ranks[name] = r
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)

    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": default_r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != default_r},
        "alpha_pattern": {}, "modules_to_save": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
