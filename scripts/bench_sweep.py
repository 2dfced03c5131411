"""Time the knee sweep on one GPU: one run at a time, K runs side by side, and packed (eager and compiled).

    PYTHONUNBUFFERED=1 python scripts/bench_sweep.py --out results/bench            # GPU, <= 8 minutes
    PYTHONUNBUFFERED=1 python scripts/bench_sweep.py --out results/bench --epochs 6 \
        --modes per_gpu packed packed_compiled --per-gpu 12                          # 372 steps a run
    PYTHONUNBUFFERED=1 python scripts/bench_sweep.py --out results/bench --epochs 6 \
        --modes packed_graphs packed_compiled packed per_gpu --per-gpu 12 --profile \
        --mode-cap-s packed_graphs=90 packed_compiled=180 packed=95 per_gpu=140 --budget-s 570
    python scripts/bench_sweep.py --smoke --out /tmp/bench                           # CPU, toy size

The workload is the knee sweep of ``configs/experiments/table3_darcy_all.yaml``'s recipe on the
fractal body (``configs/body_fractal.yaml``): LoRA on qkv/proj/fc1/fc2 with embedder and head
trained, generated Darcy-85 (1,000 / 100 / 100), batch 16, ranks {0 (head only), 1, 2, 4, 8, 16,
32, 64} x 3 seeds = 24 runs, each ``--epochs`` epochs of ``--steps-per-epoch`` steps (a real
epoch is 62; more epochs make a longer fixed step count, each with its validation and checkpoints
as in a real sweep). Every mode runs the same sweep file through ``scripts/sweep.sh``'s launcher
(``python -m orca sweep``) into its own directory:

- ``alone``: ``--per-gpu 1`` on ``--alone-runs`` of the 24 (one process at a time; its
  runs/GPU-hour is that of the whole sweep run this way), and the reference per-run results;
- ``per_gpu_K``: all 24 runs with ``--per-gpu K`` for each ``--per-gpu`` value (K processes share
  the GPU, each with its own body, CUDA context and launches);
- ``packed``: all 24 runs with ``--pack P``: one process, one body, P runs per step, eager;
- ``packed_compiled``: the same with ``train.compile=true`` (``--compile-mode``): each pack
  compiles its training step once, and the compilation counts in its wall time.
- ``packed_graphs``: the same with ``train.compile_backend=cudagraphs``: each pack records its
  step's eager kernels as CUDA graphs once (seconds), counted in its wall time, and replays them.

The separate modes run eager, as such sweeps do: compiling costs each process its own
compilation for its own few hundred steps, which a pack pays once for all its runs.
Runs per GPU-hour = runs finished / wall seconds x 3600 with the GPU held by that mode alone;
``speedup_vs_best_separate`` = the best packed mode over the best of ``alone`` and ``per_gpu_K``
(``speedup_vs_best_separate_by_mode`` has each packed mode's). Per-run results
are compared as the largest absolute difference of any run's best validation and test metric
against the same run in ``alone`` (and, for all 24 runs, against the best separate mode): bf16
autocast rounds the packed batched matmuls differently, so they agree to rounding, not bitwise.
GPU memory is the peak of ``nvidia-smi``'s used memory during the mode minus the idle reading
(all processes and CUDA contexts); utilisation its mean. Where the time goes: each pack's split
(setup, steps, evaluation, checkpoints, test) and, for separate runs, the time inside stage 3
against the launcher's wall time (the rest is process start, imports and CUDA initialisation); a
pack's first step, which holds its compilation, is reported apart from its later steps.

Each mode runs within ``--mode-cap-s`` (where given) and what is left of ``--budget-s``; a mode
stopped there, or whose runs failed, is reported as unfinished (runs finished of total, wall time,
its pack's progress lines such as the first step with its compilation) and left out of the rates
and speedups. The report is rewritten after every mode, so a bench cut short keeps what it measured.

Writes ``{out}/sweep_engine.json`` and ``.md``; run directories and data go to ``--work`` (a
temporary directory by default: 24 runs x 3 modes of checkpoints are several GB).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from orca.bodies import create_body, save_body
from orca.cli import CONFIG_SCHEMA
from orca.errors import UsageError, exit_on_error
from orca.runs import git_info, is_finished, machine_info, write_json
from orca.sweep import build_data_once, load_sweep

REPO = Path(__file__).resolve().parents[1]

RANKS = [0, 1, 2, 4, 8, 16, 32, 64]  # 0: method head (embedder and head only)
MODES = ["packed", "packed_compiled", "packed_graphs", "alone", "per_gpu"]
PACKED = ("packed", "packed_compiled", "packed_graphs")
COMPILED = ("packed_compiled", "packed_graphs")  # compiled packs, each compared with the eager pack


def sweep_yaml(args, data_root: Path, body: Optional[Path], ranks: List[int], seeds: List[int]) -> str:
    """The knee sweep's file (the smoke test's toy body and data when ``body`` is given)."""
    lora = [r for r in ranks if r > 0]
    include = [f"    - {{adapter.method: head, seed: {seeds}}}"] if 0 in ranks else []
    if body is None:
        head = (f"base: {REPO / 'configs' / 'body_fractal.yaml'}\n"
                f"task:\n  name: darcy\n  data_root: {data_root}\n"
                f"  options: {{n_train: {args.n_train}, n_val: 100, n_test: 100, workers: {os.cpu_count()}}}\n")
        device = "auto"
    else:
        head = (f"task:\n  name: darcy\n  data_root: {data_root}\n"
                "  options: {resolution: 41, subsample: 4, n_train: 16, n_val: 4, n_test: 4, workers: 1}\n"
                f"model:\n  body: swin_tiny_patch4_window7_224\n  weights: file\n  weights_file: {body}\n"
                "  img_size: 32\n  body_kwargs: {embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], "
                "window_size: 2}\n")
        device = "cpu"
    return (f"name: bench_knee\n{head}"
            "adapter: {method: lora, targets: blocks, train_embedder: true, train_head: true}\n"
            f"train: {{epochs: {args.epochs}, max_steps_per_epoch: {args.steps_per_epoch}, warmup_epochs: 0.5, "
            f"batch_size: {args.batch_size}, log_every: 10, device: {device}}}\n"
            "sweep:\n  table: knee\n"
            + (f"  grid:\n    adapter.rank: {lora}\n    seed: {seeds}\n" if lora else "")
            + ("  include:\n" + "\n".join(include) + "\n" if include else ""))


class GpuMonitor:
    """Peak used memory and mean utilisation of GPU 0 from ``nvidia-smi`` while a mode runs."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self.idle_mib = self._read()[0] if self.available else None

    def _read(self):
        out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        mem, util = (float(v) for v in out.strip().splitlines()[0].split(","))
        return mem, util

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(self._read())
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def result(self) -> Dict[str, Optional[float]]:
        if not self.samples:
            return {"gpu_memory_gib": None, "gpu_util_mean_pct": None}
        peak = max(m for m, _ in self.samples) - (self.idle_mib or 0.0)
        return {"gpu_memory_gib": round(peak / 1024, 2),
                "gpu_util_mean_pct": round(sum(u for _, u in self.samples) / len(self.samples), 1)}


def finished_runs(out: Path) -> Dict[str, Dict[str, Any]]:
    """The finished runs under a mode's output directory (a run cut short or failed has no results)."""
    runs = {}
    for summary in sorted((out / "knee").glob("*/summary.json")):
        try:
            s = json.loads(summary.read_text())
        except (OSError, ValueError):
            continue
        metric = s.get("metric") if is_finished(s) else None
        if metric is None or metric not in s.get("val", {}) or metric not in s.get("test", {}):
            continue
        runs[summary.parent.name] = {"val": s["val"][metric], "test": s["test"][metric],
                                     "wall_time_s": s["wall_time_s"], "train_img_per_s": s["train_img_per_s"],
                                     "steps": s["steps"]}
    return runs


def pack_lines(log_file: Path) -> List[str]:
    """The pack's progress lines of a launcher log (setup, first step, epochs, time split)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.startswith("[pack]") and "run directory:" not in line
            and ": test " not in line]


def run_mode(name: str, sweep: Path, out: Path, flags: List[str], timeout_s: float, log_dir: Path,
             runs_total: int) -> Dict[str, Any]:
    """One launcher invocation; its wall time, finished runs, GPU readings and per-run results.

    A mode that runs past ``timeout_s`` is stopped (its whole process group: the launcher and the
    runs it started) and reported as unfinished with what it reached; so is one whose runs failed.
    """
    cmd = [sys.executable, "-m", "orca", "sweep", str(sweep), *flags, f"sweep.output_dir={out}"]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    print(f"[bench] {name} (at most {timeout_s:.0f} s): {' '.join(cmd[1:])}", flush=True)
    log_file = log_dir / f"{name}.log"
    t0 = time.time()
    with open(log_file, "w") as log, GpuMonitor() as gpu:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(timeout_s, 0.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
    wall = time.time() - t0
    runs = finished_runs(out)
    finished = not timed_out and proc.returncode == 0 and len(runs) == runs_total
    result = {"flags": flags, "status": "finished" if finished else "unfinished", "wall_s": round(wall, 2),
              "runs_finished": len(runs), "runs_total": runs_total, "timed_out": timed_out,
              "exit_code": proc.returncode, "runs_per_gpu_hour": round(len(runs) / wall * 3600, 1) if runs else 0.0,
              **gpu.result(), "runs": runs}
    if not finished:
        result["pack_lines"] = pack_lines(log_file)
    print(f"[bench] {name}: {len(runs)}/{runs_total} runs in {wall:.1f} s = {result['runs_per_gpu_hour']} "
          f"runs/GPU-hour{' (TIMED OUT)' if timed_out else ''}{'' if finished else ' UNFINISHED'}; "
          f"GPU memory {result['gpu_memory_gib']} GiB", flush=True)
    return result


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's process group, then after at most ``grace_s`` SIGKILL whatever of it is
    left (run subprocesses a launcher leaves behind would hold the GPU during the next mode)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def metric_diff(mode: Dict[str, Any], reference: Dict[str, Any]) -> Optional[float]:
    common = set(mode["runs"]) & set(reference["runs"])
    if not common:
        return None
    return max(abs(mode["runs"][n][key] - reference["runs"][n][key]) for n in common for key in ("val", "test"))


def render(report: Dict[str, Any]) -> str:
    w = report["workload"]
    lines = ["# Sweep engine: the knee sweep one at a time, side by side, and packed (eager and compiled)", "",
             f"{w['runs']} runs (ranks {w['ranks']} x seeds {w['seeds']}; rank 0 = head only), "
             f"{'/'.join(map(str, w['steps_per_run']))} steps each at batch {w['batch_size']} ({w['epochs']} epochs of at most "
             f"{w['steps_per_epoch']}), body "
             f"{w['body']}, task {w['task']}. Machine: {report['machine'].get('gpu') or 'CPU'}; "
             f"commit {report['git']['commit'][:12]}.", "",
             f"Command: `{report['command']}`", "",
             "| mode | runs | wall s | runs / GPU-hour | vs best separate | GPU memory GiB | GPU util % | "
             "max abs metric diff vs alone |", "|---|---|---|---|---|---|---|---|"]
    best = report["best_separate_runs_per_gpu_hour"]
    for name, m in report["modes"].items():
        finished = m["status"] == "finished"
        ratio = f"{m['runs_per_gpu_hour'] / best:.2f}x" if best and finished else "-"
        rate = m["runs_per_gpu_hour"] if finished else "unfinished"
        diff = report["max_abs_metric_diff_vs_alone"].get(name)
        lines.append(f"| {name} | {m['runs_finished']}/{m['runs_total']} | {m['wall_s']} | {rate} | {ratio} | "
                     f"{m['gpu_memory_gib']} | {m['gpu_util_mean_pct']} | {'-' if diff is None else f'{diff:.2e}'} |")
    for name, u in report["unfinished"].items():
        why = "stopped at its time cap" if u["timed_out"] else f"exit code {u['exit_code']}"
        lines += ["", f"{name} is unfinished ({why}): {u['runs_finished']} of {u['runs_total']} runs in "
                  f"{u['wall_s']} s; rates and speedups leave it out."]
        lines += [f"    {line}" for line in u["pack_lines"][-12:]]
    compiled = (f"; packed_compiled ran train.compile_mode={report['compile_mode']}, "
                "its compilation inside its wall time" if report["compile_mode"] else "")
    lines += ["", f"**speedup_vs_best_separate = {report['speedup_vs_best_separate']}** "
              f"({report['best_packed']} over {report['best_separate']}; by packed mode: "
              + ", ".join(f"{n} {v}x" for n, v in report["speedup_vs_best_separate_by_mode"].items())
              + f"); packed vs the best separate mode on all its runs: max abs metric diff "
              + ", ".join(f"{n} {v:.2e}" for n, v in report["max_abs_metric_diff_packed_vs_best_separate"].items()
                          if v is not None)
              + "".join(f"; {n} vs eager packed {v:.2e}"
                        for n, v in report["max_abs_metric_diff_vs_eager_packed"].items() if v is not None) + ".", "",
              "The separate modes run eager, as such sweeps do: compiled, each process would pay its own "
              "compilation for its own few hundred steps, which a pack pays once for all its runs" + compiled + ".", "",
              "## Where the time goes", ""]
    for name, prof in report["profile"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in prof.items()))
    if report.get("packed_step_profile"):
        lines.append(f"- operators of packed steps 6-10 (torch.profiler): `{report['packed_step_profile']}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench", help="where sweep_engine.json and .md go")
    p.add_argument("--work", default=None, help="run directories and data (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU toy size: a tiny body, ranks {0, 2} x 2 seeds, one step at batch 4; packed and alone only")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=62, help="62 = a whole epoch of Darcy's 1,000 at batch 16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--per-gpu", type=int, nargs="+", default=[8, 12, 4],
                   help="K values of the side-by-side mode, in the order they are timed (the budget may cut the last)")
    p.add_argument("--pack", type=int, default=24, help="runs per pack")
    p.add_argument("--alone-runs", type=int, default=3, help="runs of the one-at-a-time mode (spread over ranks)")
    p.add_argument("--budget-s", type=float, default=480, help="stop starting modes when this much time has passed")
    p.add_argument("--modes", nargs="+", default=["packed", "alone", "per_gpu"], choices=MODES,
                   help="which modes to time, in this order (the budget may cut the last; "
                        "speedup_vs_best_separate needs a packed and a separate one)")
    p.add_argument("--compile-mode", default="default",
                   help="train.compile_mode of packed_compiled (default | reduce-overhead | max-autotune ...)")
    p.add_argument("--mode-cap-s", nargs="+", default=[], metavar="MODE=SECONDS",
                   help="the most a mode may take (e.g. packed_compiled=240 per_gpu=150; per_gpu caps every K); "
                        "a mode stopped by its cap or the budget is reported unfinished with what it reached")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of a few packed steps to sweep_engine_profile.txt "
                        "(profiling slows those steps: the packed wall time then includes it)")
    args = p.parse_args(argv)
    caps = mode_caps(args.mode_cap_s)
    t_start = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks, seeds, body = RANKS, [0, 1, 2], None
    if args.smoke:
        ranks, seeds, body = [0, 2], [0, 1], work / "tiny_body.safetensors"
        args.epochs, args.steps_per_epoch, args.batch_size, args.alone_runs, args.per_gpu = 1, 1, 4, 1, []
        kw = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}
        save_body(create_body("swin_tiny_patch4_window7_224", img_size=32, **kw), "swin_tiny_patch4_window7_224",
                  kw, str(body))
    data_root = work / "data"
    sweep = work / "knee.yaml"
    sweep.write_text(sweep_yaml(args, data_root, body, ranks, seeds))
    # the one-at-a-time subset: low, middle and top rank (seed 0), the same run names as the full sweep
    picks = sorted({ranks[round(i * (len(ranks) - 1) / max(args.alone_runs - 1, 1))] for i in range(args.alone_runs)})
    alone_sweep = work / "knee_alone.yaml"
    alone_sweep.write_text(sweep_yaml(args, data_root, body, picks, [0]))

    spec, runs = load_sweep(sweep, schema=CONFIG_SCHEMA)
    t0 = time.time()
    build_data_once(runs[:1])
    data_s = time.time() - t0
    print(f"[bench] data ready in {data_s:.1f} s; {len(runs)} runs of {args.epochs} x {args.steps_per_epoch} steps",
          flush=True)
    logs = out / "sweep_engine_logs"
    logs.mkdir(exist_ok=True)
    modes: Dict[str, Dict[str, Any]] = {}
    remaining = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731
    profile_file = out / "sweep_engine_profile.txt"

    def timed(name: str, family: str, sweep_file: Path, flags: List[str], total: int) -> None:
        """Run one mode within its cap and the budget left, then write the report as it stands."""
        left = remaining()
        if left < 30:
            print(f"[bench] {name} skipped: the time budget is spent", flush=True)
            return
        cap = min(left, caps.get(name, caps.get(family, left)))
        modes[name] = run_mode(name, sweep_file, work / name, flags, cap, logs, total)
        write_report(out, build_report(args, argv, modes, work, runs, ranks, seeds, data_s, profile_file))

    for mode in dict.fromkeys(args.modes):  # in the order given: the budget cuts the last
        if mode in PACKED:
            flags = ["--pack", str(args.pack), "--pack-timing", str(work / f"pack_timing_{mode}.jsonl")]
            if mode == "packed_compiled":
                flags += ["train.compile=true", f"train.compile_mode={args.compile_mode}"]
            elif mode == "packed_graphs":
                flags += ["train.compile=true", "train.compile_backend=cudagraphs"]
            elif args.profile:
                flags += ["--pack-profile", str(profile_file)]
            timed(mode, mode, sweep, flags, len(runs))
        elif mode == "alone":
            timed("alone", "alone", alone_sweep, ["--gpus", "1" if not args.smoke else "0"], len(picks))
        else:
            for k in args.per_gpu:
                timed(f"per_gpu_{k}", "per_gpu", sweep, ["--gpus", "1", "--per-gpu", str(k)], len(runs))
    report = build_report(args, argv, modes, work, runs, ranks, seeds, data_s, profile_file)
    write_report(out, report)
    print(render(report), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def mode_caps(items: List[str]) -> Dict[str, float]:
    """``--mode-cap-s`` values ``MODE=SECONDS`` (a mode, ``per_gpu_K``, or ``per_gpu`` for every K) as a dict."""
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (name in MODES or re.fullmatch(r"per_gpu_\d+", name)) or not seconds > 0:
            raise UsageError(f"--mode-cap-s {item}: not MODE=SECONDS", None,
                             f"give a mode ({', '.join(MODES)} or per_gpu_K) and seconds > 0, e.g. packed_compiled=240")
        caps[name] = seconds
    return caps


def write_report(out: Path, report: Dict[str, Any]) -> None:
    write_json(out / "sweep_engine.json", report)
    (out / "sweep_engine.md").write_text(render(report))


def build_report(args, argv, modes: Dict[str, Dict[str, Any]], work: Path, runs, ranks, seeds, data_s: float,
                 profile_file: Path) -> Dict[str, Any]:
    """The report over the modes timed so far; rates and speedups compare finished modes only."""
    done = {n: m for n, m in modes.items() if m["status"] == "finished"}
    separate = {n: m for n, m in done.items() if n not in PACKED}
    best = max(separate, key=lambda n: separate[n]["runs_per_gpu_hour"]) if separate else None
    best_rate = separate[best]["runs_per_gpu_hour"] if best else None
    by_mode = {n: round(done[n]["runs_per_gpu_hour"] / best_rate, 2) for n in PACKED if n in done and best_rate}
    best_packed = max(by_mode, key=by_mode.get) if by_mode else None
    profile: Dict[str, Dict[str, Any]] = {"data_generation_s": {"wall": round(data_s, 1)}}
    for mode in (n for n in PACKED if n in modes):
        timing_file = work / f"pack_timing_{mode}.jsonl"
        packs = [json.loads(line) for line in timing_file.read_text().splitlines()] if timing_file.exists() else []
        for i, pack in enumerate(packs):
            entry = profile[f"{mode}, pack {i + 1} ({len(pack['runs'])} runs)"] = {
                k: round(v, 2) if isinstance(v, float) else v for k, v in pack.items() if k != "runs"}
            later, seconds = pack["steps"] - 1, pack["train_s"] - pack["first_step_s"]  # the first step compiles
            entry["ms_per_later_step"] = round(1000 * seconds / later, 1) if later > 0 else None
            entry["train_img_per_s_later_steps"] = (round(len(pack["runs"]) * args.batch_size * later / seconds, 1)
                                                    if later > 0 and seconds > 0 else None)
    for name, m in modes.items():
        if name in PACKED or not m["runs"]:
            continue
        inside = sum(r["wall_time_s"] for r in m["runs"].values())
        concurrency = 1 if name == "alone" else int(name.rsplit("_", 1)[-1])
        profile[name] = {"mean_stage3_s_per_run": round(inside / len(m["runs"]), 2),
                         "mean_launcher_s_per_run_slot": round(m["wall_s"] * concurrency / len(m["runs"]), 2),
                         "mean_train_img_per_s_per_run": round(
                             sum(r["train_img_per_s"] for r in m["runs"].values()) / len(m["runs"]), 1)}
        # K runs training side by side: what the GPU does for them together while all K train
        profile[name]["train_img_per_s_all_concurrent_runs"] = round(
            profile[name]["mean_train_img_per_s_per_run"] * concurrency, 1)
    return {
        "workload": {"runs": len(runs), "ranks": ranks, "seeds": seeds, "epochs": args.epochs,
                     "steps_per_epoch": args.steps_per_epoch,
                     "steps_per_run": sorted({r["steps"] for m in modes.values() for r in m["runs"].values()}),
                     "batch_size": args.batch_size,
                     "task": "darcy (toy)" if args.smoke else f"darcy-85, n_train {args.n_train}",
                     "body": "toy Swin (smoke)" if args.smoke else "fractal Swin (configs/body_fractal.yaml)",
                     "alone_runs": sorted(modes["alone"]["runs"]) if "alone" in modes else []},
        "runs_per_gpu_hour": {n: m["runs_per_gpu_hour"] for n, m in done.items()},
        "unfinished": {n: {"runs_finished": m["runs_finished"], "runs_total": m["runs_total"], "wall_s": m["wall_s"],
                           "timed_out": m["timed_out"], "exit_code": m["exit_code"],
                           "pack_lines": m.get("pack_lines", [])}
                       for n, m in modes.items() if m["status"] != "finished"},
        "gpu_memory_gib": {n: m["gpu_memory_gib"] for n, m in modes.items()},
        "best_separate": best, "best_separate_runs_per_gpu_hour": best_rate,
        "best_packed": best_packed, "speedup_vs_best_separate": by_mode.get(best_packed),
        "speedup_vs_best_separate_by_mode": by_mode,
        "compile_mode": args.compile_mode if "packed_compiled" in modes else None,
        "max_abs_metric_diff_vs_alone": {n: metric_diff(m, modes["alone"]) for n, m in modes.items()
                                         if n != "alone" and "alone" in modes},
        "max_abs_metric_diff_packed_vs_best_separate": {n: metric_diff(modes[n], modes[best]) for n in by_mode},
        "max_abs_metric_diff_vs_eager_packed": {n: metric_diff(modes[n], modes["packed"])
                                                for n in COMPILED if n in modes and "packed" in modes},
        "profile": profile, "modes": modes,
        "packed_step_profile": profile_file.name if args.profile and profile_file.exists() else None,
        "data_s": round(data_s, 1),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])]),
        "git": git_info(), "machine": machine_info(),
    }

if __name__ == "__main__":
    sys.exit(exit_on_error(main))
