"""Shared pieces of the training benchmarks (scripts/bench_train.py): configurations, one step,
FLOP counting, the matmul peak and provenance.

Why a module: every benchmark must time the *same* step (bf16 autocast, fused AdamW on CUDA,
method hooks included) and report the same provenance, or their numbers are not comparable.
The benchmark model is the ORCA shape with the body's own patch embedding as embedder:
body (timm Swin, random weights) -> mean-pooled features -> Linear head -> cross-entropy.
"""
from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from orca.checkpointing import set_checkpointing, summary as checkpointing_summary
from orca.runs import git_info as git_state, machine_info  # noqa: F401  (one source of run facts)

GC_WHERE = "--grad-checkpointing"  # how checkpointing errors name the setting (bench_train.py's flag)
BLOCK_LINEARS = r"layers\.\d+\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


class BenchModel(nn.Module):
    """embedder (identity: the body keeps its patch embedding) -> body -> head, named as ORCAModel."""

    def __init__(self, body: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.embedder = nn.Identity()
        self.body = body
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def create_body(model_name: str, device: torch.device, **kwargs) -> nn.Module:
    """A randomly initialised timm body without classifier (seeded: every config starts alike)."""
    import timm

    torch.manual_seed(0)
    with device:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)


def build_config(method: str, *, model_name: str, device: torch.device, rank: int = 8, num_classes: int = 100,
                 rank_map: Optional[str] = None, body_kwargs: Optional[Dict[str, Any]] = None,
                 grad_ckpt_stages: Sequence[Union[int, str]] = (), compile: bool = False,
                 compile_mode: Optional[str] = None) -> Dict[str, Any]:
    """One resident benchmark configuration: model, (compiled) forward, optimizer, adapter method.

    Args:
        method: ``peft`` (HF peft LoRA, the reference) or a registered adapter method
            (full, lora, dylora, delta_lora, qlora); LoRA-type methods adapt every block
            qkv/proj/fc1/fc2 with rank ``rank`` unless ``rank_map`` (a stage-2 JSON) says otherwise.
        grad_ckpt_stages: what recomputes its activations in backward, as ``train.grad_checkpointing``:
            a body stage S (all its blocks) or ``"S:K"`` (its first K blocks), e.g. ``(0, 1, "2:6")``.
            The returned ``"checkpointing"`` says what that meant for this body (``"off"`` when empty).
    """
    body = create_body(model_name, device, **(body_kwargs or {}))
    if grad_ckpt_stages:
        set_checkpointing(body, list(grad_ckpt_stages), GC_WHERE)
    checkpointing = checkpointing_summary(body)
    model = BenchModel(body, body.num_features, num_classes).to(device)
    adapter = None
    if method == "peft":
        import peft

        names = [n for n, m in body.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)]
        model.body = peft.get_peft_model(body, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names))
        params = [p for p in model.parameters() if p.requires_grad]
        counts = {"trainable": sum(p.numel() for p in params)}
        groups = [{"params": params, "weight_decay": 0.01}]
    else:
        from orca.adapters import AdapterConfig, build_method

        extra = {"delta_lora_start": 0} if method == "delta_lora" else {}  # time the W update from step 0
        cfg = AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, targets="all", rank_map=rank_map,
                            train_embedder=True, train_head=True, **extra)
        adapter = build_method(cfg)
        counts = adapter.prepare(model)  # adapters are created on the base layer's device
        groups = adapter.param_groups(model, lr=1e-4, weight_decay=0.01)
        counts = {"trainable": counts["trainable"], "adapters": counts["adapters"]}
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=fused)
    forward = torch.compile(model, mode=compile_mode) if compile else model
    return {"model": model, "forward": forward, "opt": opt, "counts": counts, "adapter": adapter, "step": 0,
            "checkpointing": checkpointing,
            "autocast": (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
            else contextlib.nullcontext}


def train_step(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor, forward: Optional[Callable] = None) -> None:
    """One optimizer step, with the adapter method's per-step hooks (DyLoRA's rank, Delta-LoRA's W update)."""
    adapter, step = cfg["adapter"], cfg["step"]
    if adapter is not None:
        adapter.on_step_start(cfg["model"], step)
    with cfg["autocast"]():
        loss = F.cross_entropy((forward or cfg["forward"])(x).float(), y)
    loss.backward()
    cfg["opt"].step()
    cfg["opt"].zero_grad(set_to_none=True)
    if adapter is not None:
        adapter.on_step_end(cfg["model"], step)
    cfg["step"] = step + 1


def count_step_flops(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise work is not counted),
    by ``torch.utils.flop_counter`` on the eager model: compiled and eager steps do the same matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(cfg, x, y, forward=cfg["model"])
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                       iters: int = 20, repeats: int = 3) -> float:
    """Measured dense matmul throughput (TFLOP/s) of an ``n``-cubed product: the MFU denominator.

    Measured rather than taken from a datasheet, because clocks, power caps and the torch/cuBLAS
    build decide what this GPU reaches (SPEC.md: 789 TFLOP/s bf16 on the H100 in use).
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        synchronize(device)
        rates.append(2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    return statistics.median(rates)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine(device: torch.device) -> Dict[str, Any]:
    """orca.runs.machine_info plus the GPU's memory and SM count (what the throughput depends on)."""
    info = machine_info()
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    return info


def median_rate(items_per_block: int, seconds: List[float]) -> float:
    return items_per_block / statistics.median(seconds)
