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

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from orca.adapters import AdapterConfig, build_method, count_parameters
from orca.adapters.base import set_trainable
from orca.adapters.base_weights import (ComposedDenseWeight, ConcatDenseWeight, FusedGradDenseWeight,
                                        InplaceDenseWeight, JoinedDenseWeight)
from orca.adapters.lora import LoRALinear
from orca.adapters.targets import target_linears
from orca.bodies import set_attention
from orca.checkpointing import set_checkpointing, summary as checkpointing_summary
from orca.config import ModelConfig
from orca.runs import git_info as git_state, machine_info  # noqa: F401  (one source of run facts)
from orca.train import uses_cuda_graphs

GC_WHERE = "--grad-checkpointing"  # how checkpointing errors name the setting (bench_train.py's flag)


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
    torch.manual_seed(0)
    with device:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)


def build_config(method: str, *, model_name: str, device: torch.device, rank: int = 8, num_classes: int = 100,
                 rank_map: Optional[str] = None, body_kwargs: Optional[Dict[str, Any]] = None,
                 grad_ckpt_stages: Sequence[Union[int, str]] = (), compile: bool = False,
                 compile_mode: Optional[str] = None, ddp: bool = False,
                 attention: str = ModelConfig.attention) -> Dict[str, Any]:
    """One resident benchmark configuration: model, (compiled) forward, optimizer, adapter method.

    Args:
        method: ``peft`` (HF peft LoRA, the reference), ``lora_composed`` / ``lora_concat`` /
            ``lora_inplace`` / ``lora_joined`` / ``lora_fused`` (our LoRA through
            :class:`orca.adapters.base_weights.ComposedDenseWeight` / ``ConcatDenseWeight`` /
            ``InplaceDenseWeight`` / ``JoinedDenseWeight`` / ``FusedGradDenseWeight``) or a
            registered adapter method
            (full, lora, dylora, delta_lora, qlora); LoRA-type methods adapt every block
            qkv/proj/fc1/fc2 with rank ``rank`` unless ``rank_map`` (a stage-2 JSON) says otherwise.
            ``rank0``: no adapters, the body frozen but its patch embedding trained, so the backward
            still crosses every block without a rank-r product anywhere: the step LoRA would take if
            its adapters cost nothing (ORCA's zero-rank end, whose embedder trains before the body).
        grad_ckpt_stages: what recomputes its activations in backward, as ``train.grad_checkpointing``:
            a body stage S (all its blocks) or ``"S:K"`` (its first K blocks), e.g. ``(0, 1, "2:6")``.
            The returned ``"checkpointing"`` says what that meant for this body (``"off"`` when empty).
        attention: the body's window attention, ``auto``, ``sdpa`` or ``bmm``
            (:func:`orca.bodies.set_attention`; default: stage 3's); peft wraps the same body, so the
            reference gets the same kernels.
        ddp: step through ``DistributedDataParallel`` (one process per GPU, the process group already
            initialised), compiled around the DDP module as stage 3 does (orca.train). FLOP counting
            still uses the bare model: a rank's FLOPs are one GPU's, with no collective in the count.
    """
    body = create_body(model_name, device, **(body_kwargs or {}))
    set_attention(body, attention)
    if grad_ckpt_stages:
        set_checkpointing(body, list(grad_ckpt_stages), GC_WHERE)
    checkpointing = checkpointing_summary(body)
    model = BenchModel(body, body.num_features, num_classes).to(device)
    adapter = None
    if method == "peft":
        import peft

        names = target_linears(body, "blocks")  # the same 96 Linears (Swin-B) as ours below
        model.body = peft.get_peft_model(body, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names))
        params = [p for p in model.parameters() if p.requires_grad]
        counts = {"trainable": sum(p.numel() for p in params)}
        groups = [{"params": params, "weight_decay": 0.01}]
    else:
        # our LoRA through plain autograd ops (lora_composed), always the one-GEMM forward (lora_concat)
        # or always the in-place rank-r update (lora_inplace), or the default forms with the backward's
        # two GEMMs over g joined (lora_joined), or A's and B's gradients from one pass over g
        # (lora_fused); plain lora takes the one-GEMM form when compiled and the in-place one in eager mode
        access = {"lora_composed": ComposedDenseWeight, "lora_concat": ConcatDenseWeight,
                  "lora_inplace": InplaceDenseWeight, "lora_joined": JoinedDenseWeight,
                  "lora_fused": FusedGradDenseWeight}.get(method)
        extra = {"delta_lora_start": 0} if method == "delta_lora" else {}  # time the W update from step 0
        registered = "lora" if access else "head" if method == "rank0" else method
        cfg = AdapterConfig(method=registered, rank=rank, alpha=2.0 * rank, targets="blocks",
                            rank_map=rank_map, train_embedder=True, train_head=True, **extra)
        adapter = build_method(cfg)
        counts = adapter.prepare(model)  # adapters are created on the base layer's device
        if method == "rank0":  # the input gradient must cross every block, as for an adapter in block 0
            if not isinstance(getattr(body, "patch_embed", None), nn.Module):
                raise ValueError(f"rank0 trains the body's patch_embed, which {model_name} does not have")
            set_trainable(body.patch_embed, True)
            counts = count_parameters(model)
        if access:
            for layer in model.modules():
                if isinstance(layer, LoRALinear):
                    layer.weight_access = access
        groups = adapter.param_groups(model, lr=1e-4, weight_decay=0.01)
        counts = {"trainable": counts["trainable"], "adapters": counts["adapters"]}
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=fused)
    forward = model
    if ddp:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(forward, mode=compile_mode) if compile else forward
    return {"model": model, "forward": forward, "opt": opt, "counts": counts, "adapter": adapter, "step": 0,
            "checkpointing": checkpointing,
            "cuda_graphs": compile and uses_cuda_graphs(compile_mode) and device.type == "cuda",
            "autocast": (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
            else contextlib.nullcontext}


def train_step(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor, forward: Optional[Callable] = None) -> None:
    """One optimizer step, with the adapter method's per-step hooks (DyLoRA's rank, Delta-LoRA's W update)."""
    adapter, step = cfg["adapter"], cfg["step"]
    if cfg.get("cuda_graphs") and forward is None:
        # CUDA-graph trees: a new step begins here, so the previous step's graph outputs may be reused
        # (as orca.train does); without it, interleaved configurations re-record or warn.
        torch.compiler.cudagraph_mark_step_begin()
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


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """C += A B with A m x k and B k x n: 2 m k n, as torch.utils.flop_counter counts mm."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_step_flops(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise work is not counted),
    by ``torch.utils.flop_counter`` on the eager model: compiled and eager steps do the same matmuls."""
    # torch's counter knows addmm but not its in-place form, which FusedLoRALinear's forward uses for
    # the rank-r update (and its backward for small token counts): count it as the same GEMM.
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
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
    build decide what this GPU reaches (704-793 TFLOP/s bf16 from run to run on the H100s and
    H200s behind results/bench/).
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


# --- profiling (bench_train.py --profile) -------------------------------------------------------

PROFILE_CATEGORIES = ("GEMM", "attention", "elementwise/reduction", "copy/cast", "optimizer", "other")
_OPTIMIZER = re.compile(r"adam|_foreach|multi_tensor_apply|optimizer\.step")
_ATTENTION = re.compile(r"flash|fmha|sdpa|scaled_dot_product|attention")
_GEMM = re.compile(r"gemm|gemv|sm[89]0_|cutlass|cublas|nvjet|matmul|xmma|splitk|convolution|conv2d|fprop|dgrad|wgrad|"
                   r"(?<![a-z])(mm|bmm|addmm|baddbmm)_?(?![a-z])")  # convolutions are implicit GEMMs
_COPY = re.compile(r"copy|memcpy|cast|contiguous|clone|(?<![a-z])to(?![a-z])")
# fused Inductor kernels that only cast / lay out (their name lists the fused ops)
_TRITON_COPY_ONLY = re.compile(r"triton_(poi|red|per)_fused(_+(to_copy|copy|clone|view|permute|transpose|t|"
                               r"unsafe_view|expand|squeeze|unsqueeze|\d+))+")
_ELEMENTWISE = re.compile(r"elementwise|vectorized|reduce|reduction|triton_(poi|red|per)|softmax|norm|gelu|silu|relu|"
                          r"dropout|(?<![a-z])(add|mul|div|sub|sum|mean|exp|where|fill|cat|roll|pad|index\w*|"
                          r"addcmul|addcdiv|sqrt|rsqrt|neg|pow|zero|zeros|ones|empty_like|bias)_?(?![a-z])")
_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch")


def profile_category(name: str) -> str:
    """Which of ``PROFILE_CATEGORIES`` a kernel (or, on CPU, an op) belongs to -- by its name only, so
    approximate: a fused kernel that does a GEMM plus an epilogue counts as GEMM, a fused Inductor
    pointwise kernel that also casts counts as elementwise."""
    n = name.lower()
    if _OPTIMIZER.search(n):
        return "optimizer"
    if _ATTENTION.search(n):
        return "attention"
    if _GEMM.search(n):
        return "GEMM"
    if _TRITON_COPY_ONLY.fullmatch(n) or (_COPY.search(n) and not n.startswith("triton_")):
        return "copy/cast"
    if _ELEMENTWISE.search(n):
        return "elementwise/reduction"
    return "other"


def profile_steps(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device,
                  trace: Optional[str] = None) -> Dict[str, Any]:
    """``steps`` extra training steps under ``torch.profiler`` (CPU, plus CUDA on a GPU): the raw
    ``key_averages`` rows (times in microseconds, summed over the steps) and the wall time per step
    (profiler overhead included). Run after warm-up (and compilation); ``trace``: a Chrome trace path."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(cfg, x, y)
        synchronize(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    rows = []
    for e in prof.key_averages():
        # device rows: kernels, memcpy, memset; "annotation": a record_function's span on the GPU timeline
        # (e.g. Optimizer.step#AdamW.step), which would count its kernels twice
        kind = ("CPU" if e.device_type == torch.autograd.DeviceType.CPU
                else "annotation" if getattr(e, "is_user_annotation", False) else "device")
        rows.append({"name": e.key, "count": int(e.count), "device_type": kind,
                     "self_cpu_us": float(e.self_cpu_time_total), "cpu_us": float(e.cpu_time_total),
                     "self_device_us": float(getattr(e, "self_device_time_total", 0) or 0),
                     "device_us": float(getattr(e, "device_time_total", 0) or 0)})
    return {"steps": steps, "device": device.type, "wall_ms_per_step": 1e3 * wall / steps, "key_averages": rows}


def summarize_profile(prof: Dict[str, Any], top: int = 25) -> Dict[str, Any]:
    """Per-step figures of a ``profile_steps`` result.

    With device events (CUDA): device time = the summed durations of the device events (kernels,
    memcpy, memset; busy time, not the step's wall span), ``kernels`` = their count, CPU time = the
    self CPU time of every CPU-side op and CUDA runtime call (all threads: the autograd engine's too).
    Without (CPU): the "device" figures are the ops' self CPU time and ``kernels`` counts op events
    (nested ops included), so ``device_ms`` equals ``cpu_ms``.
    """
    n = prof["steps"]
    rows = prof["key_averages"]
    cpu_rows = [r for r in rows if r["device_type"] == "CPU"]
    dev_rows = [r for r in rows if r["device_type"] == "device"]
    on_device = bool(dev_rows)
    timed = [(r, r["device_us"]) for r in dev_rows] if on_device else [(r, r["self_cpu_us"]) for r in cpu_rows]
    total_us = sum(t for _, t in timed)
    ms = lambda us: us / n / 1e3  # noqa: E731
    cats = {c: 0.0 for c in PROFILE_CATEGORIES}
    for r, t in timed:
        cats[profile_category(r["name"])] += ms(t)
    ranked = sorted(timed, key=lambda rt: -rt[1])
    top_rows = [{"name": r["name"], "category": profile_category(r["name"]), "calls_per_step": r["count"] / n,
                 "ms_per_step": ms(t), "share": t / total_us if total_us else 0.0} for r, t in ranked[:top]]
    launches = [r for r in cpu_rows if r["name"] in _LAUNCH_CALLS]
    cpu_top = sorted(cpu_rows, key=lambda r: -r["self_cpu_us"])[:top]
    return {"timing": "device" if on_device else "cpu_self",
            "device_ms": ms(total_us), "cpu_ms": ms(sum(r["self_cpu_us"] for r in cpu_rows)),
            "kernels_per_step": sum(r["count"] for r, _ in timed) / n,
            "launch_calls_per_step": sum(r["count"] for r in launches) / n,
            "launch_calls_cpu_ms": ms(sum(r["self_cpu_us"] for r in launches)),
            "wall_ms_per_step": prof["wall_ms_per_step"],
            "gemm_ms": cats["GEMM"], "non_gemm_ms": ms(total_us) - cats["GEMM"], "categories_ms": cats,
            "top": top_rows,
            "cpu_top": [{"name": r["name"], "calls_per_step": r["count"] / n, "self_cpu_ms_per_step": ms(r["self_cpu_us"])}
                        for r in cpu_top]}


def short_kernel_name(name: str, width: int = 80) -> str:
    """A kernel name without the namespace noise of templated CUDA names, cut to ``width`` characters."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "at::", "std::"):
        name = name.replace(noise, "")
    name = " ".join(name.split()).replace("|", "/")
    return name if len(name) <= width else name[:width - 1] + "…"
