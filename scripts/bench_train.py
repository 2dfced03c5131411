"""Training throughput, model FLOP utilisation and peak memory of every fine-tuning method, one GPU.

    python scripts/bench_train.py                                     # all methods, batch 64 and 256, eager
    python scripts/bench_train.py --rank-map runs/stage2__.../rank_map.json    # adds lora_map
    python scripts/bench_train.py --compile --methods full lora peft --batch-sizes 256
    python scripts/bench_train.py --grad-checkpointing 0 1 2 3 --methods full lora --batch-sizes 256
    python scripts/bench_train.py --grad-checkpointing 0 1 2:6 --methods full lora --batch-sizes 256
    python scripts/bench_train.py --smoke                             # CPU: tiny Swin, 2 steps (tests)
    python scripts/bench_train.py --compile --methods full lora --batch-sizes 64 --profile 3 --tag _compile_b64
                                                  # + train_compile_b64_profile.md: where each step's time goes

Setup: timm Swin-B at 224 with random weights, random images and
labels, mean-pooled features -> Linear(1024, 100) -> cross-entropy, bf16 autocast, fused AdamW.
Configurations: ``full``; ``lora`` (ours, r = 8 on every block qkv/proj/fc1/fc2; its forward is one
GEMM over [x, x A^T] when compiled and the base GEMM plus an in-place rank-r update in eager mode,
``orca.adapters.base_weights.DenseWeight``); ``lora_composed`` (the same LoRA through plain autograd ops
instead of the fused Function: what the Function's Python forward and backward cost per step);
``lora_concat`` / ``lora_inplace`` (the same LoRA pinned to the one-GEMM / the in-place form, eager
and compiled alike); ``lora_joined`` (the default forms, with the backward's two GEMMs over the
output gradient joined into one, ``JoinedDenseWeight``: measured 0.99x lora, kept as a record); ``lora_fused``
(the default forms with A's and B's gradients from one pass over the output gradient, a Triton kernel
on CUDA, ``FusedGradDenseWeight``); ``lora_map``
(ours, a stage-2 rank map); ``dylora``; ``delta_lora`` (W update active from step 0); ``qlora``
(NF4 base + LoRA); ``peft`` (HF peft LoRA r = 8, the reference); ``rank0`` (no adapters, the body
frozen, its patch embedding trained: the backward crosses every block with no rank-r product, so
this is how fast a LoRA step could be if its adapters cost nothing); with ``--grad-checkpointing``
also ``full+gc`` and ``lora+gc`` (activation checkpointing: each entry a body stage S, all its
blocks, or S:K, its first K blocks, as ``train.grad_checkpointing``; the JSON rows and the markdown
say which blocks of how many were recomputed).

Method: all configurations stay resident and are timed in interleaved blocks (each repeat visits
every configuration once), so clock or thermal drift hits them alike; warm-up steps (compilation
included) are excluded; the median over repeats is reported. FLOPs per step come from
``torch.utils.flop_counter`` on one eager step of that configuration; MFU = FLOPs/step x steps/s
over the bf16 matmul peak measured here (8192^3). A LoRA step does fewer FLOPs than a full step
(no frozen-weight gradients), so ``mfu_full_equiv`` also reports the full step's FLOPs per image at
the configuration's speed: the utilisation it would take to reach that img/s with full fine-tuning.
A configuration's peak memory is its own block's peak minus the other configurations' resident
memory; under CUDA graphs (``--compile-mode reduce-overhead`` or ``max-autotune``) it is not reported, since a graph's
memory pool is taken at capture and looks resident. Compiling Swin-B takes about 2 min per
configuration and batch size: with ``--compile`` pick a few methods per call and one batch size per
process (a second shape recompiles), as ``reproduce.sh bench_graphs`` does. With ``--compile`` peft is
compiled too, the reference in its best mode; ``--eager-methods peft`` times it eager instead. The
markdown's ``vs peft`` column names which (``vs peft (compiled)`` / ``vs peft (eager)``), and every
JSON row says whether its configuration was compiled. One call for the LoRA step against its
ceiling and the reference::

    python scripts/bench_train.py --compile --methods full lora lora_fused rank0 peft --attention sdpa \
        --batch-sizes 256 --tag _compile_sdpa_fused_b256

Writes ``results/bench/train{tag}.json`` and ``.md`` (tag: ``_compile``, ``_gc``, ``_smoke`` or
``--tag``) with machine, torch version, git commit (+ dirty flag) and the exact command.

Several GPUs (``torchrun --nproc_per_node=N scripts/bench_train.py ...``; scripts/bench_ddp.py runs it
beside the 1-GPU baseline): every configuration steps through DistributedDataParallel, each rank
at the full ``--batch-sizes`` (the batch is *per GPU*, as in weak scaling) on its own random data;
img/s counts the images of all ranks, peak memory is rank 0's; rank 0 alone writes, with
``world_size`` in every row and ``_ddp{N}`` in the default file name.

``--profile N``: after all timed blocks, N *extra* steps of every (configuration, batch size) run under
``torch.profiler`` (CPU + CUDA activities; after warm-up, so compiled models are profiled compiled),
so the profiler's overhead never enters the img/s figures. ``train{tag}_profile.md`` gets, per
configuration, device (kernel) time, CPU time and kernels per step, the top 25 kernels by device
time, device time by category (GEMM, attention, elementwise/reduction, copy/cast, optimizer, other:
by kernel name, approximate) and a summary table side by side; ``train{tag}_profile.json`` the raw
``key_averages`` rows. ``--profile-trace DIR`` also exports a Chrome trace per configuration. On CPU
(``--smoke``) the "device" figures are the ops' self CPU time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]

from orca.bench import (GC_WHERE, build_config, count_step_flops, create_body, free_memory, git_state, machine,
                        matmul_peak_tflops, median_rate, profile_steps, summarize_profile, synchronize, train_step)
from orca.bench_report import attention_lines, profile_sections
from orca.bodies import ATTENTION_KINDS, set_attention
from orca.checkpointing import (describe as describe_checkpointing, normalize as normalize_checkpointing,
                                plan as plan_checkpointing)
from orca.config import ModelConfig
from orca.distributed import setup_distributed, world_from_env
from orca.errors import exit_on_error
from orca.schema import ConfigError

METHODS = ("full", "lora", "lora_composed", "lora_concat", "lora_inplace", "lora_joined", "lora_fused", "lora_map",
           "dylora",
           "delta_lora", "qlora", "peft", "rank0")
GC_METHODS = ("full", "lora")
SMOKE_BODY = {"img_size": 32, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "window_size": 2}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: all (lora_map only with --rank-map; qlora only on CUDA)")
    p.add_argument("--rank-map", default=None, help="stage-2 rank-map JSON for the lora_map configuration")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration and batch size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed blocks per configuration")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="torch.compile each configuration's model")
    p.add_argument("--eager-methods", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                   help="with --compile: leave these methods eager (e.g. peft, the reference as its users run it), "
                        "so compiled ours and the eager reference are timed in one run")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--grad-checkpointing", nargs="+", default=None, metavar="S|S:K",
                   help="also time full+gc and lora+gc with these checkpointed: a body stage S (all its blocks) "
                        "or S:K (its first K blocks), e.g. 0 1 2:6")
    p.add_argument("--attention", nargs="+", default=[ModelConfig.attention], choices=ATTENTION_KINDS,
                   help="the body's window attention (orca.bodies.set_attention; default: stage 3's, "
                        f"model.attention={ModelConfig.attention}: sdpa on Swin V1); with sdpa and bmm, every "
                        "configuration is timed with each, the sdpa ones named NAME+sdpa")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny Swin, batch 4, 2 steps")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--tag", default=None, help="file-name suffix (default from --compile/--grad-checkpointing/--smoke)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, profile N extra steps of every configuration and batch size "
                        "(torch.profiler) into train{tag}_profile.md/.json; 0: off")
    p.add_argument("--profile-trace", type=Path, default=None, metavar="DIR",
                   help="with --profile: also export a Chrome trace per configuration and batch size into DIR")
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error("--profile N needs N >= 0")
    if args.profile_trace is not None and not args.profile:
        p.error("--profile-trace needs --profile N")
    if args.methods is None:
        args.methods = [m for m in METHODS if (m != "lora_map" or args.rank_map)
                        and (m != "qlora" or (torch.cuda.is_available() and not args.smoke))]
    if "lora_map" in args.methods and not args.rank_map:
        p.error("--methods lora_map needs --rank-map PATH (a stage-2 rank_map.json)")
    if args.rank_map and not Path(args.rank_map).is_file():
        p.error(f"--rank-map {args.rank_map}: no such file")
    if args.smoke:
        args.model, args.batch_sizes, args.steps, args.warmup, args.repeats = "swin_tiny_patch4_window7_224", [4], 2, 1, 1
    try:  # the kinds the body really runs with (auto resolved), bmm rows first; its stages checked below
        body = create_body(args.model, torch.device("meta"), **(SMOKE_BODY if args.smoke else {}))
        args.attention = sorted({set_attention(body, kind) for kind in args.attention}, key=("bmm", "sdpa").index)
    except ValueError as err:
        p.error(f"--attention: {err}")
    if args.eager_methods and not args.compile:
        p.error("--eager-methods only means something with --compile")
    if args.compile_mode == "default":
        args.compile_mode = None
    if args.grad_checkpointing is not None:  # refuse e.g. 2:30 on a stage of 18 blocks before anything is timed
        try:
            args.grad_checkpointing = normalize_checkpointing(args.grad_checkpointing, GC_WHERE)
            plan_checkpointing(body, args.grad_checkpointing, GC_WHERE)
        except ConfigError as err:
            p.error(str(err))
    return args


def configurations(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """(name, method, rank map, checkpointing entries, attention) of every configuration, in table order."""
    out = [{"name": m, "method": "lora" if m == "lora_map" else m,
            "rank_map": args.rank_map if m == "lora_map" else None, "gc": ()} for m in args.methods]
    if args.grad_checkpointing:
        out += [{"name": f"{m}+gc", "method": m, "rank_map": None, "gc": tuple(args.grad_checkpointing)}
                for m in GC_METHODS if m in args.methods]
    return [dict(spec, name=spec["name"] + sdpa_suffix(kind, args), attention=kind)
            for kind in args.attention for spec in out]


def sdpa_suffix(kind: str, args: argparse.Namespace) -> str:
    """``+sdpa`` on the sdpa rows of a run that times both attention kinds; otherwise no suffix (every
    row says its ``attention``, the markdown's header too)."""
    return "+sdpa" if kind == "sdpa" and len(args.attention) > 1 else ""


def run(args: argparse.Namespace, device: torch.device) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Time every configuration (the JSON rows, keyed ``config@batch``); with ``--profile``, then profile it."""
    cuda = device.type == "cuda"
    world, rank = args.world, args.rank_id
    img = 32 if args.smoke else 224
    body_kwargs = dict(SMOKE_BODY) if args.smoke else {}
    data = {}
    for b in args.batch_sizes:
        gen = torch.Generator(device=device).manual_seed(b + 1000 * rank)  # each rank its own images
        data[b] = (torch.randn(b, 3, img, img, device=device, generator=gen),
                   torch.randint(0, args.num_classes, (b,), device=device, generator=gen))
    free_memory()
    configs: Dict[str, Dict[str, Any]] = {}
    results: Dict[str, Dict[str, Any]] = {}
    oom = (torch.cuda.OutOfMemoryError,) if cuda else ()
    for spec in configurations(args):
        name = spec["name"]
        before = torch.cuda.memory_allocated(device) if cuda else 0
        compiled = args.compile and spec["method"] not in args.eager_methods
        try:
            cfg = build_config(spec["method"], model_name=args.model, device=device, rank=args.rank,
                               num_classes=args.num_classes, rank_map=spec["rank_map"], body_kwargs=body_kwargs,
                               grad_ckpt_stages=spec["gc"], compile=compiled, compile_mode=args.compile_mode,
                               ddp=world > 1, attention=spec["attention"])
            cfg["flops"], t0 = {}, time.perf_counter()
            for b in args.batch_sizes:  # FLOP count, then warm-up (and compilation) at every batch size
                try:
                    try:
                        cfg["flops"][b] = count_step_flops(cfg, *data[b])
                    except oom:
                        raise
                    except Exception as err:  # noqa: BLE001 - a FLOP-counter gap must not cost the timing
                        print(f"[{name}] FLOP count failed at batch {b}: {type(err).__name__}: {err}", flush=True)
                        cfg["opt"].zero_grad(set_to_none=True)
                        cfg["flops"][b] = None
                    for _ in range(args.warmup):
                        train_step(cfg, *data[b])
                    synchronize(device)
                except oom:
                    cfg["opt"].zero_grad(set_to_none=True)
                    free_memory()
                    results[f"{name}@{b}"] = {"config": name, "batch": b, "status": "oom"}
            cfg["warmup_s"] = time.perf_counter() - t0
        except oom:
            free_memory()
            for b in args.batch_sizes:
                results[f"{name}@{b}"] = {"config": name, "batch": b, "status": "oom"}
            continue
        except Exception as err:  # noqa: BLE001 - e.g. a reference that fails to compile: report it, time the rest
            traceback.print_exc()
            free_memory()
            for b in args.batch_sizes:
                results[f"{name}@{b}"] = {"config": name, "batch": b, "status": f"failed ({type(err).__name__})"}
            continue
        free_memory()
        cfg["resident"] = (torch.cuda.memory_allocated(device) if cuda else 0) - before
        configs[name] = cfg
        print(f"[{name}] built; resident {cfg['resident'] / 2**30:.2f} GiB, warm-up {cfg['warmup_s']:.1f} s, "
              f"{cfg['counts']}", flush=True)

    times: Dict[str, List[float]] = {}
    peaks: Dict[str, List[int]] = {}
    for rep in range(args.repeats):
        for b in args.batch_sizes:
            for name, cfg in configs.items():
                key = f"{name}@{b}"
                if results.get(key, {}).get("status") == "oom":
                    continue
                x, y = data[b]
                synchronize(device)
                if cuda:
                    others = torch.cuda.memory_allocated(device) - cfg["resident"]
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        train_step(cfg, x, y)
                    synchronize(device)
                    elapsed = time.perf_counter() - t0
                except oom:
                    cfg["opt"].zero_grad(set_to_none=True)
                    free_memory()
                    results[key] = {"config": name, "batch": b, "status": "oom"}
                    continue
                times.setdefault(key, []).append(elapsed)
                if cuda:
                    if not cfg["cuda_graphs"]:  # a graph's memory pool is allocated at capture, in warm-up:
                        # it counts as the configuration's resident memory, so peak - others is meaningless
                        peaks.setdefault(key, []).append(torch.cuda.max_memory_allocated(device) - others)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    profiles: Dict[str, Dict[str, Any]] = {}
    if args.profile:  # extra steps after every timed block: the profiler's overhead never enters img/s
        if args.profile_trace:
            args.profile_trace.mkdir(parents=True, exist_ok=True)
        for b in args.batch_sizes:
            for name, cfg in configs.items():
                key = f"{name}@{b}"
                if key not in times:
                    continue
                trace = (str(args.profile_trace / f"{stem(args)}_{re.sub(r'[^A-Za-z0-9_-]', '_', name)}_b{b}.json")
                         if args.profile_trace else None)
                try:
                    profiles[key] = profile_steps(cfg, *data[b], args.profile, device, trace=trace)
                except oom:
                    cfg["opt"].zero_grad(set_to_none=True)
                    free_memory()
                    profiles[key] = {"error": "out of memory"}
                except Exception as err:  # noqa: BLE001 - a profiler failure must not cost the timings
                    cfg["opt"].zero_grad(set_to_none=True)
                    profiles[key] = {"error": f"{type(err).__name__}: {err}"}
                print(f"[{key}] profiled {args.profile} steps"
                      + (f": {profiles[key]['error']}" if "error" in profiles[key] else ""), flush=True)

    peak_tflops = args.peak_tflops
    spec_of = {spec["name"]: spec for spec in configurations(args)}
    for key, ts in times.items():
        name, b = key.rsplit("@", 1)
        b = int(b)
        ips = median_rate(world * b * args.steps, ts)  # every rank stepped b images in rank 0's time
        flops = configs[name]["flops"].get(b)
        # utilisation per GPU: FLOPs per image x the images one GPU steps per second, over one GPU's peak
        mfu = (lambda f: float(f"{f / b * ips / world / (peak_tflops * 1e12):.4g}") if f else None)  # noqa: E731
        row = {"config": name, "batch": b, "status": "ok", "img_per_s": round(ips, 1),
               "img_per_s_repeats": [round(world * b * args.steps / t, 1) for t in ts],
               "world_size": world, "img_per_s_per_gpu": round(ips / world, 1),
               "flop_per_step": flops, "gflop_per_img": round(flops / b / 1e9, 4) if flops else None,
               "mfu": mfu(flops),
               "peak_gib": round(max(peaks[key]) / 2**30, 2) if key in peaks else None,
               "trainable_params": configs[name]["counts"]["trainable"],
               "grad_checkpointing": list(spec_of[name]["gc"]) or None, "attention": spec_of[name]["attention"],
               "checkpointing": configs[name]["checkpointing"], "cuda_graphs": configs[name]["cuda_graphs"],
               "compiled": args.compile and spec_of[name]["method"] not in args.eager_methods,
               "warmup_s": round(configs[name]["warmup_s"], 1)}
        full = "full" + sdpa_suffix(spec_of[name]["attention"], args)  # full fine-tuning, same attention kernels
        full_flops = configs[full]["flops"].get(b) if full in configs else None
        if full_flops:
            row["mfu_full_equiv"] = mfu(full_flops)
        results[key] = row
    return results, profiles


def write(results: Dict[str, Any], args: argparse.Namespace, device: torch.device) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(device), "git": git_state(),
            "command": args.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "matmul_peak_tflops": float(f"{args.peak_tflops:.4g}"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    order = [c["name"] for c in configurations(args)]
    rows = [results[k] for k in sorted(results, key=lambda k: (results[k]["batch"], order.index(results[k]["config"])))]
    stem_ = stem(args)
    (args.out / f"{stem_}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    ref = {(r["batch"], r["config"]): r.get("img_per_s") for r in rows if r["status"] == "ok"}
    gpu = meta["machine"]["gpu"] or f"CPU, {meta['machine']['cpus']} cores"
    gpus = f"{args.world} x {gpu}, DDP, batch per GPU" if args.world > 1 else gpu
    lines = [f"# Training throughput ({gpus}, {compiled_label(args)})", "",
             f"`{meta['command']}`", "",
             f"torch {meta['machine']['torch']}, git {meta['git']['commit']}{' (dirty)' if meta['git']['dirty'] else ''}, "
             f"{meta['date']}; {args.model}, {'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}, "
             f"r = {args.rank}; window attention {' and '.join(args.attention)}; "
             f"median of {args.repeats} interleaved blocks of {args.steps} steps after "
             f"{args.warmup} warm-up steps; matmul peak {meta['matmul_peak_tflops']} TFLOP/s.", "",
             *gc_lines(rows, args),
             f"| batch | config | img/s | vs full | vs peft ({peft_mode(args)}) | GFLOP/img | MFU | MFU (full-step FLOPs) "
             "| peak GiB | trainable |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['config']} | {r['status']} | | | | | | | |")
            continue
        same = sdpa_suffix(r["attention"], args)  # ratios to the same attention kernels
        rel = lambda other: (f"{r['img_per_s'] / ref[(r['batch'], other + same)]:.2f}x"  # noqa: E731
                             if ref.get((r["batch"], other + same)) else "")
        peak = (f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else
                "n/a (CUDA graphs)" if r["cuda_graphs"] else "n/a")
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
        equiv = pct(r["mfu_full_equiv"]) if "mfu_full_equiv" in r else ""
        gflop = f"{r['gflop_per_img']:.4g}" if r["gflop_per_img"] is not None else "n/a"
        lines.append(f"| {r['batch']} | {r['config']} | {r['img_per_s']:.1f} | {rel('full')} | {rel('peft')} | "
                     f"{gflop} | {pct(r['mfu'])} | {equiv} | {peak} | {r['trainable_params']:,} |")
    lines += attention_lines(rows)
    (args.out / f"{stem_}.md").write_text("\n".join(lines) + "\n")
    return args.out / f"{stem_}.md"


def peft_mode(args: argparse.Namespace) -> str:
    """How the peft reference ran in this call: ``eager`` or ``compiled`` (with the compile mode)."""
    if not args.compile or "peft" in args.eager_methods:
        return "eager"
    return "compiled" + (f", {args.compile_mode}" if args.compile_mode else "")


def compiled_label(args: argparse.Namespace) -> str:
    """How the configurations ran: ``eager``, or ``torch.compile`` with its mode and the eager exceptions."""
    if not args.compile:
        return "eager"
    label = "torch.compile" + (f", mode {args.compile_mode}" if args.compile_mode else "")
    return label + (f"; eager: {', '.join(args.eager_methods)}" if args.eager_methods else "")


def stem(args: argparse.Namespace) -> str:
    """``train{tag}``: the output files' name without suffix."""
    tag = args.tag if args.tag is not None else ("_smoke" if args.smoke else "") + \
        ("_compile" if args.compile else "") + ("_gc" if args.grad_checkpointing else "") + \
        ("_sdpa" if len(args.attention) > 1 else "") + (f"_ddp{args.world}" if args.world > 1 else "")
    return f"train{tag}"


def write_profile(profiles: Dict[str, Dict[str, Any]], results: Dict[str, Any], args: argparse.Namespace,
                  device: torch.device) -> Path:
    """``train{tag}_profile.md`` (per-step figures, top kernels, categories) and ``.json`` (+ raw rows)."""
    args.out.mkdir(parents=True, exist_ok=True)
    order = [c["name"] for c in configurations(args)]
    keys = sorted(profiles, key=lambda k: (int(k.rsplit("@", 1)[1]), order.index(k.rsplit("@", 1)[0])))
    summaries = {k: summarize_profile(profiles[k]) for k in keys if "error" not in profiles[k]}
    for k, s in summaries.items():  # the unprofiled step time of the same configuration, from the timing
        ips = results.get(k, {}).get("img_per_s")
        s["timed_ms"] = 1e3 * int(k.rsplit("@", 1)[1]) / ips if ips else None
    meta = {"machine": machine(device), "git": git_state(), "command": args.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "profile_steps": args.profile, "compile": args.compile,
            "timing": "device" if device.type == "cuda" else "cpu_self"}
    out = {**meta, "categorisation": "by kernel (CPU: op) name, approximate; see orca.bench.profile_category",
           "results": [{"config": k.rsplit("@", 1)[0], "batch": int(k.rsplit("@", 1)[1]),
                        **({"error": profiles[k]["error"]} if k not in summaries else
                           {"summary": summaries[k], "key_averages": profiles[k]["key_averages"]})} for k in keys]}
    base = f"{stem(args)}_profile"
    (args.out / f"{base}.json").write_text(json.dumps(out, indent=1) + "\n")

    cuda = device.type == "cuda"
    gpu = meta["machine"]["gpu"] or f"CPU, {meta['machine']['cpus']} cores"
    lines = [f"# Training step profile ({gpu}, {compiled_label(args)})", "",
             f"`{meta['command']}`", "",
             f"torch {meta['machine']['torch']}, git {meta['git']['commit']}{' (dirty)' if meta['git']['dirty'] else ''}, "
             f"{meta['date']}; {args.model}, r = {args.rank}. {args.profile} extra steps per configuration and batch "
             f"size under `torch.profiler` (CPU{' + CUDA' if cuda else ''} activities), run after all timed blocks "
             f"(and after warm-up/compilation): the img/s of `{stem(args)}.md` do not include them.", ""]
    lines += profile_sections(keys, summaries, {k: p["error"] for k, p in profiles.items() if "error" in p}, cuda)
    md = args.out / f"{base}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def gc_lines(rows: List[Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    """The markdown's account of what ``+gc`` recomputed (entries, and blocks per stage on this body)."""
    names = [c["name"] for c in configurations(args) if c["gc"]]
    if not names:
        return []
    done = next((r["checkpointing"] for r in rows if r.get("checkpointing") and r["config"] in names), None)
    return [f"{', '.join(f'`{n}`' for n in names)}: activation checkpointing "
            f"`--grad-checkpointing {describe_checkpointing(args.grad_checkpointing)}`"
            + (f" = {done}." if done else "."), ""]


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    """Run the benchmark; the markdown's path (None on the ranks other than 0 of a torchrun job)."""
    args = parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__).relative_to(REPO)),
                                                     *(sys.argv[1:] if argv is None else argv)])
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("bench_train.py needs a CUDA GPU (or --smoke for the CPU smoke run)")
    # Under torchrun: join the group, one GPU per rank. --batch-sizes are per GPU, so any world size
    # divides the global batch (world x batch) that setup_distributed checks.
    dist_, device = setup_distributed(world_from_env()[1] * min(args.batch_sizes), device)
    args.world, args.rank_id = dist_.world, dist_.rank
    if args.world > 1:
        args.command = f"torchrun --standalone --nproc_per_node={args.world} " + args.command.split(" ", 1)[1]
    if not dist_.main:  # rank 0 reports for all
        sys.stdout = open(os.devnull, "w")
    if args.world > 1 and args.profile:
        raise SystemExit("bench_train.py: --profile runs on one GPU; drop it under torchrun")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        args.peak_tflops = matmul_peak_tflops(device)
    else:
        args.peak_tflops = matmul_peak_tflops(device, n=256, dtype=torch.float32, iters=5)
    print(f"matmul peak: {args.peak_tflops:.4g} TFLOP/s", flush=True)
    try:
        results, profiles = run(args, device)
    except ConfigError as err:  # e.g. --grad-checkpointing 2:30 on a stage of 18 blocks
        raise SystemExit(f"bench_train.py: {err}") from None
    finally:
        dist_.close()
    if not dist_.main:
        return None
    path = write(results, args, device)
    print(path.read_text())
    if args.profile:
        prof_md = write_profile(profiles, results, args, device)
        print(prof_md.read_text())
    return path


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
