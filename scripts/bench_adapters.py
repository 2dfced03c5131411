"""Training throughput and peak memory of timm Swin-B under each fine-tuning method, on one GPU.

    python scripts/bench_adapters.py                                   # full, lora, peft, qlora @ 64, 256
    python scripts/bench_adapters.py --compile                         # torch.compile'd forward
    python scripts/bench_adapters.py --methods full lora --batch-sizes 256 --steps 20 --repeats 5

Setup (SPEC.md "Reference numbers"): swin_base_patch4_window7_224 with random weights, 224x224
random images, mean-pooled features -> Linear(1024, 100) -> cross-entropy on random labels, bf16
autocast, fused AdamW. Methods: ``full`` (every parameter), ``lora`` (ours, r = 8 on every block
qkv/proj/fc1/fc2), ``peft`` (HF peft LoRA r = 8 on the same modules), ``qlora`` (ours: NF4 base +
the same LoRA). All configurations stay resident and are timed in interleaved blocks (each repeat
visits every configuration once), so clock or thermal drift hits them alike; warm-up steps (which
include compilation) are excluded and the median over repeats is reported. A configuration's peak
memory is the peak during its own block minus the other configurations' resident memory, i.e. what
it would need alone. One configuration running out of memory is recorded as "oom" and the others
go on.

Writes ``results/bench/adapters.json`` and ``adapters.md`` (``adapters_compile.*`` with --compile) with the GPU, torch version, git commit
(+ dirty flag) and the exact command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orca.bench import BLOCK_LINEARS, free_memory, git_state  # noqa: E402  (shared with bench_train.py)
from orca.bench import BenchModel as Model  # noqa: E402
from orca.bench import machine as _machine  # noqa: E402

METHODS = ("full", "lora", "peft", "qlora")


def machine() -> Dict[str, Any]:
    return _machine(torch.device("cuda"))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed blocks per configuration")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--tag", default=None,
                   help="suffix of the output file names (default: '' eager, '_compile' compiled)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
def build(method: str, args: argparse.Namespace) -> Dict[str, Any]:
    import timm

    from orca.adapters import AdapterConfig, build_method

    torch.manual_seed(0)
    with torch.device("cuda"):
        body = timm.create_model(args.model, pretrained=False, num_classes=0)
    model = Model(body, body.num_features, args.num_classes).cuda()
    if method == "peft":
        import re

        import peft

        names = [n for n, m in body.named_modules() if isinstance(m, nn.Linear)
                 and re.fullmatch(BLOCK_LINEARS, n)]
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=names)
        model.body = peft.get_peft_model(body, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        counts = {"trainable": sum(p.numel() for p in params)}
        groups = [{"params": params, "weight_decay": 0.01}]
    else:
        cfg = AdapterConfig(method=method, rank=args.rank, alpha=2.0 * args.rank, targets="all",
                            train_embedder=True, train_head=True)
        adapter = build_method(cfg)
        counts = adapter.prepare(model)
        groups = adapter.param_groups(model, lr=1e-4, weight_decay=0.01)
        counts = {"trainable": counts["trainable"], "adapters": counts["adapters"]}
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    fwd = torch.compile(model) if args.compile else model
    return {"model": model, "forward": fwd, "opt": opt, "counts": counts}


def train_step(cfg: Dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(cfg["forward"](x).float(), y)
    loss.backward()
    cfg["opt"].step()
    cfg["opt"].zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Dict[str, Any]:
    data = {}
    for b in args.batch_sizes:
        gen = torch.Generator(device="cuda").manual_seed(b)
        data[b] = (torch.randn(b, 3, 224, 224, device="cuda", generator=gen),
                   torch.randint(0, args.num_classes, (b,), device="cuda", generator=gen))
    free_memory()
    configs: Dict[str, Dict[str, Any]] = {}
    results: Dict[str, Dict[str, Any]] = {}
    for method in args.methods:
        before = torch.cuda.memory_allocated()
        try:
            cfg = build(method, args)
            t0 = time.perf_counter()
            for b in args.batch_sizes:  # warm-up (and compilation) at every batch size
                try:
                    for _ in range(args.warmup):
                        train_step(cfg, *data[b])
                    torch.cuda.synchronize()
                except torch.cuda.OutOfMemoryError:
                    cfg["opt"].zero_grad(set_to_none=True)
                    free_memory()
                    results[f"{method}@{b}"] = {"method": method, "batch": b, "status": "oom"}
            cfg["warmup_s"] = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            free_memory()
            for b in args.batch_sizes:
                results[f"{method}@{b}"] = {"method": method, "batch": b, "status": "oom"}
            continue
        free_memory()
        cfg["resident"] = torch.cuda.memory_allocated() - before
        configs[method] = cfg
        print(f"[{method}] built; resident {cfg['resident'] / 2**30:.2f} GiB, "
              f"warm-up {cfg['warmup_s']:.1f} s, {cfg['counts']}", flush=True)

    times: Dict[str, List[float]] = {}
    peaks: Dict[str, List[int]] = {}
    for rep in range(args.repeats):
        for b in args.batch_sizes:
            for method, cfg in configs.items():
                key = f"{method}@{b}"
                if results.get(key, {}).get("status") == "oom":
                    continue
                x, y = data[b]
                torch.cuda.synchronize()
                others = torch.cuda.memory_allocated() - cfg["resident"]
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                try:
                    start.record()
                    for _ in range(args.steps):
                        train_step(cfg, x, y)
                    end.record()
                    torch.cuda.synchronize()
                except torch.cuda.OutOfMemoryError:
                    cfg["opt"].zero_grad(set_to_none=True)
                    free_memory()
                    results[key] = {"method": method, "batch": b, "status": "oom"}
                    continue
                times.setdefault(key, []).append(start.elapsed_time(end) / 1000)
                peaks.setdefault(key, []).append(torch.cuda.max_memory_allocated() - others)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    for key, ts in times.items():
        method, b = key.split("@")
        b = int(b)
        med = statistics.median(ts)
        results[key] = {
            "method": method, "batch": b, "status": "ok",
            "img_per_s": round(b * args.steps / med, 1),
            "img_per_s_repeats": [round(b * args.steps / t, 1) for t in ts],
            "peak_gib": round(max(peaks[key]) / 2**30, 2),
            "trainable_params": configs[method]["counts"]["trainable"],
            "warmup_s": round(configs[method]["warmup_s"], 1),
        }
    return results


# ---------------------------------------------------------------------------------------------
# provenance and output
# ---------------------------------------------------------------------------------------------
def write(results: Dict[str, Any], args: argparse.Namespace) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "git": git_state(),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    rows = [results[k] for k in sorted(results, key=lambda k: (results[k]["batch"],
                                                                METHODS.index(results[k]["method"])))]
    tag = args.tag if args.tag is not None else ("_compile" if args.compile else "")
    stem = f"adapters{tag}"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    full = {r["batch"]: r.get("img_per_s") for r in rows if r["method"] == "full"}
    lines = [f"# Adapter training throughput ({meta['machine']['gpu']}, "
             f"{'torch.compile' if args.compile else 'eager'})", "",
             f"`{meta['command']}`", "",
             f"torch {meta['machine']['torch']}, git {meta['git']['commit']}"
             f"{' (dirty)' if meta['git']['dirty'] else ''}, {meta['date']}; {args.model}, bf16 "
             f"autocast, fused AdamW, r = {args.rank}; median of {args.repeats} interleaved blocks "
             f"of {args.steps} steps after {args.warmup} warm-up steps.", "",
             "| batch | method | img/s | vs full | peak GiB | trainable params |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['method']} | {r['status']} | | | |")
            continue
        rel = f"{r['img_per_s'] / full[r['batch']]:.2f}x" if full.get(r["batch"]) else ""
        lines.append(f"| {r['batch']} | {r['method']} | {r['img_per_s']:.1f} | {rel} | "
                     f"{r['peak_gib']:.2f} | {r['trainable_params']:,} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return args.out / f"{stem}.md"


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_adapters.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = run(args)
    path = write(results, args)
    print(path.read_text())


if __name__ == "__main__":
    main()
