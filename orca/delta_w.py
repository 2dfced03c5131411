"""Delta W spectra: what full fine-tuning changed in each body Linear, kept small enough to commit.

Why a file: the rank-gap hypothesis (scripts/hypothesis.py, analysis (c)) correlates each block's
gap with the effective rank of its update Delta W = W_ft - W_0. Checkpoints (50-350 MB) are not
kept; the singular values are (a few hundred kB for Swin-B), and any energy threshold or the stable
rank follows from them later. Stage 3 writes ``delta_w.json.gz`` (gzipped JSON, see
``orca.spectra``) for the methods that train the body's weights.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from orca.config import ExperimentConfig
from orca.runs import RunDir, atomic_write_bytes
from orca.spectra import DELTA_W_FILE, SPECTRUM_DIGITS, delta_w_spectra, encode_spectra, spectrum_ranks

DELTA_W_METHODS = ("full", "delta_lora")  # the methods whose body weights W change in training


def body_linear_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """CPU copies of the weights of every ``nn.Linear`` in the body's stages (``body.layers.*``: qkv,
    proj, fc1, fc2, downsample reduction), keyed by module path; taken before any adapter is injected."""
    return {f"body.{name}": m.weight.detach().to("cpu", copy=True)
            for name, m in model.body.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("layers.")}


@torch.no_grad()
def effective_weights(model: torch.nn.Module, names: List[str]) -> Dict[str, torch.Tensor]:
    """The weight each named module computes with now, on CPU: ``weight`` of a plain Linear, or
    W + s B A of a LoRA wrapper (Delta-LoRA moves W and trains B A; the update is their sum)."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        w = m.merged_weight() if hasattr(m, "merged_weight") else m.weight
        out[name] = w.detach().float().cpu()
    return out


def write_delta_w(run: RunDir, model: torch.nn.Module, w0: Dict[str, torch.Tensor], cfg: ExperimentConfig,
                  tested: str, resumed: bool, log: Callable[[str], None] = print) -> Path:
    """Write ``delta_w.json.gz``: the singular values of each body Linear's update Delta W = W_ft - W_0.

    Checkpoints are not kept; these spectra (a few hundred kB for Swin-B) are what
    ``scripts/hypothesis.py`` analysis (c) needs. Ranks are not stored: any energy threshold is
    computed later by ``orca.spectra.spectrum_ranks``.
    """
    t0 = time.time()
    names = list(w0)
    if not names:
        raise ValueError("the body has no nn.Linear under body.layers; nothing to compare")
    spectra = delta_w_spectra({f"{n}.weight": w for n, w in w0.items()},
                              {f"{n}.weight": w for n, w in effective_weights(model, names).items()}, names)
    rel = [spectrum_ranks(v["s"])["fro"] / max(v["w0_fro"], 1e-12) for v in spectra.values()]
    median = float(np.median(rel))
    meta = {
        "what": "singular values s (descending, float64 SVD, %d significant digits) of Delta W = W_ft - W_0 "
                "per body Linear weight; shape [d_out, d_in]; w0_fro = ||W_0||_F" % SPECTRUM_DIGITS,
        "ranks": "not stored: any energy threshold and the stable rank follow from s "
                 "(orca.spectra.spectrum_ranks)",
        "method": cfg.adapter.method, "task": cfg.task.name, "seed": cfg.seed,
        "W_ft": tested + ("; LoRA wrappers count as W + s B A" if cfg.adapter.method != "full" else ""),
        "W_0": f"the body as built at the start of this stage-3 process by orca.train.initial_model "
               f"(seed_everything(seed={cfg.seed}, deterministic={cfg.train.deterministic}) -> build_task -> "
               f"build_model), copied before the adapter method was applied"
               + ("; the run was resumed, so rebuilt that way by the resuming process" if resumed else ""),
        "resumed": resumed,
        "median_rel_update": median,
        "median_rel_update_note": "median over Linears of ||Delta W||_F / ||W_0||_F; ~1.4 means W_0 is not the start",
    }
    head = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
    body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in spectra.items())
    text = "{\n" + head + ',\n  "layers": {\n' + body + "\n  }\n}\n"
    path = run.file(DELTA_W_FILE)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(encode_spectra(text)))
    log(f"[stage3] {DELTA_W_FILE}: Delta W spectra of {len(spectra)} body Linears (W_ft = {tested.split(' (')[0]}), "
        f"median ||Delta W||/||W_0|| = {median:.3g}" + (" (> 0.5: W_0 is probably not the start!)" if median > 0.5 else "")
        + f", {time.time() - t0:.1f}s")
    return path
