"""Sweeps: a grid of stage-3 runs from one experiment YAML, resumable, one GPU per run.

Why this file is long: a sweep's file (schema, grid expansion, run names) and its launcher (in
process, one subprocess per GPU slot, packed) share every decision about which run is done, whose
it is and how it resumes; the Slurm array is orca/slurm.py and packed training orca/packed.py.

    bash scripts/sweep.sh configs/experiments/table2_darcy_attn.yaml --dry-run     # list runs, done/pending
    bash scripts/sweep.sh configs/experiments/table2_darcy_attn.yaml               # every visible GPU, one run each
    bash scripts/sweep.sh configs/experiments/table4_darcy_otdd.yaml model.embedder_from=results/runs/stage1__...
    bash scripts/sweep.sh configs/experiments/table2_darcy_attn.yaml --gpus 0 train.epochs=2   # sequential, in-process
    bash scripts/sweep.sh configs/experiments/table3_darcy_all.yaml --pack 24      # 24 runs at a time, one body
    python -m orca sweep configs/experiments/table1_smallgap.yaml sweep.output_dir=/tmp/runs
    bash scripts/sweep.sh configs/experiments/ranks_patches.yaml --slurm --submit   # a Slurm job array (orca/slurm.py)

A sweep file is an ordinary experiment config (``base:`` chain, sections, keys) plus a ``sweep:``
section that the experiment schema does not know, so it is taken out here and checked against
:class:`SweepSpec` with the same nearest-key errors as every other config section::

    base: ../darcy_swinb.yaml
    train: {epochs: 20}
    sweep:
      table: table2                                 # which seed table the runs belong to
      output_dir: results/runs                      # runs go to {output_dir}/{table}/{name}
      grid: {adapter.rank: [1, 8], seed: [0, 1]}    # cartesian product of dotted overrides
      exclude: [{adapter.rank: 8, seed: 1}]         # drop points whose resolved config matches
      include: [{adapter.method: full, seed: [0, 1]}]   # extra sub-grids on top of the base config
      require: [model.embedder_from]                # keys every run must have set (else an error)
      gpus_per_run: 1                               # >1: each run under torchrun, DDP over that many GPUs

A sweep file may be the ``base:`` of another (Table 3 and 4 build on Table 2's): the ``sweep:``
sections merge like any other section, key by key inside ``grid``, while lists (``include``,
``exclude``, each grid's values) replace the base's. A value that is itself a list is written as a
one-element list of it (``adapter.targets: [[...]]``).

Why deterministic run directories (``lora_r8_s1``) instead of the time-stamped ones of single runs:
a sweep restarted after a crash must find its own runs again. A run whose ``summary.json`` says
``finished`` is done and skipped; any other run is started with ``run_dir=`` set, so stage 3 resumes it from
``ckpt/last.pt`` when it got that far. Each run directory also gets ``sweep.json`` (table tag, row,
grid point), which ``scripts/make_tables.py`` groups by.

Command-line overrides apply to every run and are not part of the run name: changing
``train.epochs`` on the command line does not rerun runs that are already complete.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

import orca.packed
import orca.train
from datasets.progress import Progress
from datasets.registry import build_task
from orca.config import ExperimentConfig, config_dict, parse_override, read_yaml, save_config
from orca.errors import exit_on_error
from orca.runs import REPO_ROOT, RunDir, usable_cpus, write_json
from orca.schema import ConfigError, from_dict, nearest, to_dict

#: Methods whose result does not depend on ``adapter.rank``: their run names and table rows omit it.
RANKLESS_METHODS = ("full", "head")
#: Tasks that generate their data into a cache under ``task.data_root`` on first use (built once
#: before parallel workers start). Fractal tasks render in memory per run: building them here would
#: only cost time and memory in the driver.
DISK_CACHED_TASKS = ("darcy",)
#: torchrun's variables: a sweep started under torchrun must not make each single-GPU run join a group.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
#: Grid keys that are always part of a run's name in a fixed place (method, rank, then seed last).
_NAMED_KEYS = ("adapter.method", "adapter.rank", "seed")


@dataclass
class SweepSpec:
    """The ``sweep:`` section of a sweep file."""

    grid: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "dotted override key -> list of values; the runs are their cartesian product"})
    include: List[Dict[str, Any]] = field(default_factory=list, metadata={
        "help": "extra sub-grids (key -> value or list of values), each applied to the base config alone"})
    exclude: List[Dict[str, Any]] = field(default_factory=list, metadata={
        "help": "drop runs whose resolved config matches every key of one entry (key -> value or list)"})
    table: str = field(default="untagged", metadata={
        "help": "which results table the runs belong to (table1..table4 are the seed's), also a path component"})
    output_dir: str = field(default="results/runs", metadata={"help": "runs go to {output_dir}/{table}/{run name}"})
    require: List[str] = field(default_factory=list, metadata={
        "help": "dotted keys that must be set (not null) in every run, e.g. model.embedder_from for Table 4"})
    gpus_per_run: int = field(default=1, metadata={
        "help": "GPUs per run: above 1 each run is launched with torchrun, one DDP process per GPU "
                "(train.batch_size stays the global batch, so results compare with 1-GPU runs)"})

    def __post_init__(self):
        if not isinstance(self.gpus_per_run, int) or self.gpus_per_run < 1:
            raise ConfigError(f"sweep.gpus_per_run must be an integer >= 1, got {self.gpus_per_run!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.table):
            raise ConfigError(f"sweep.table={self.table!r} must be a plain name such as table2 (it names a directory)")
        self.grid = _as_subgrid(self.grid, "sweep.grid")
        self.include = [_as_subgrid(entry, f"sweep.include[{i}]") for i, entry in enumerate(self.include)]
        self.exclude = [_as_subgrid(entry, f"sweep.exclude[{i}]") for i, entry in enumerate(self.exclude)]
        if not self.grid and not self.include:
            raise ConfigError("sweep: needs a non-empty sweep.grid or sweep.include (nothing to run)")


def _as_subgrid(entry: Any, where: str) -> Dict[str, List[Any]]:
    """``{key: value | [values]}`` -> ``{key: [values]}``; a list-valued override must be written [[...]]."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted keys to values, got {entry!r}")
    out = {}
    for key, values in entry.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"{where}: key {key!r} must be a dotted config key such as adapter.rank")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"{where}.{key}: empty list of values")
        out[key] = values
    return out


def _expand(subgrid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    keys = list(subgrid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(subgrid[k] for k in keys))]


@dataclass
class SweepRun:
    """One grid point: its name, overrides, resolved config (``run_dir`` set) and table tag."""

    name: str
    table: str
    point: Dict[str, Any]
    cfg: ExperimentConfig
    gpus: int = 1  # processes (one GPU each) that train this run together under torchrun

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def done(self) -> bool:
        return RunDir(self.run_dir).finished() is not None if self.run_dir.is_dir() else False

    @property
    def row(self) -> str:
        """The run name without its seed: the runs of one table row differ only in seed."""
        return re.sub(r"_s-?\d+$", "", self.name)

    def record(self, sweep_file: str, cli_overrides: Sequence[str]) -> Dict[str, Any]:
        """What ``sweep.json`` holds: enough for the tables to group runs without reading configs."""
        a = self.cfg.adapter
        return {"table": self.table, "name": self.name, "row": self.row, "seed": self.cfg.seed,
                "method": a.method, "rank": None if a.method in RANKLESS_METHODS or a.rank_map is not None else a.rank,
                "rank_map": a.rank_map if isinstance(a.rank_map, (str, type(None))) else "inline",
                "targets": a.targets, "task": self.cfg.task.name, "epochs": self.cfg.train.epochs,
                "point": self.point, "cli_overrides": list(cli_overrides), "sweep_file": sweep_file,
                "gpus_per_run": self.gpus}


def _set(data: Dict[str, Any], key: str, value: Any, where: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} in {key!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _lookup(resolved: Dict[str, Any], key: str, where: str) -> Any:
    node: Any = resolved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            hint = nearest(part, list(node)) if isinstance(node, dict) else ""
            raise ConfigError(f"{where}: {key!r} is not a config key{hint} (see `python -m orca show-config`)")
        node = node[part]
    return node


def _slug(value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:40] or "x"


def run_name(cfg: ExperimentConfig, point: Dict[str, Any]) -> str:
    """``{method}[_r{rank}|_rankmap][_{key}-{value}...]_s{seed}``: stable across invocations."""
    a = cfg.adapter
    parts = [a.method]
    if a.method not in RANKLESS_METHODS:
        parts.append("rankmap" if a.rank_map is not None else f"r{a.rank}")
    for key in sorted(k for k in point if k not in _NAMED_KEYS):
        value = point[key]
        if key == "adapter.rank_map" and isinstance(value, str):
            # A stage-2 map is its run directory's rank_map.json: the directory names it, not the path.
            path = Path(value)
            value = path.parent.name if path.name == "rank_map.json" and path.parent.name else path.stem
        parts.append(f"{key.split('.')[-1]}-{_slug(value)}")
    parts.append(f"s{cfg.seed}")
    return "_".join(parts)


def _build_config(data: Dict[str, Any], where: str, schema: Type[ExperimentConfig]) -> ExperimentConfig:
    if isinstance(data.get("task"), dict) and "name" in data["task"] and "options" not in data["task"]:
        data["task"]["options"] = {}  # as load_config: a changed task must not inherit the old task's options
    try:
        return from_dict(schema, data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = (),
               schema: Type[ExperimentConfig] = ExperimentConfig) -> Tuple[SweepSpec, List[SweepRun]]:
    """Read a sweep file and expand it into runs (in grid order, then include order; duplicates dropped).

    Args:
        path: the sweep YAML (an experiment config with a ``sweep:`` section).
        overrides: dotted ``key=value`` strings; ``sweep.*`` keys edit the sweep section, all others
            apply to every run.
        schema: the experiment schema the runs' configs are built with (``orca.cli`` passes the
            one with every stage's sections, as for a single run).

    Raises:
        ConfigError: unknown sweep or config key (naming the nearest valid one), bad value, or a
            grid point whose config does not validate (naming the point).
    """
    data = read_yaml(path)
    sweep_data = data.pop("sweep", None)
    if not isinstance(sweep_data, dict):
        raise ConfigError(f"{path}: a sweep file needs a 'sweep:' mapping (grid, include, exclude, table, output_dir)")
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "sweep":
            if len(keys) < 2:
                raise ConfigError(f"override {text!r}: name a key of the sweep section, e.g. sweep.output_dir=DIR")
            _set(sweep_data, ".".join(keys[1:]), value, f"override {text!r}")
        else:
            _set(data, ".".join(keys), value, f"override {text!r}")
    spec = from_dict(SweepSpec, sweep_data, "sweep")

    points = _expand(spec.grid) if spec.grid else []
    for entry in spec.include:
        points.extend(_expand(entry))
    runs: Dict[str, SweepRun] = {}
    for point in points:
        where = f"sweep point {point}"
        run_data = copy.deepcopy(data)
        for key, value in point.items():
            _set(run_data, key, value, where)
        cfg = _build_config(run_data, where, schema)
        resolved = config_dict(cfg)
        for key in spec.require:
            if _lookup(resolved, key, "sweep.require") is None:
                raise ConfigError(f"{path}: this sweep needs {key}=... (sweep.require); pass it on the command line, "
                                  f"e.g. `bash scripts/sweep.sh {path} {key}=VALUE`")
        if any(all(_lookup(resolved, k, f"sweep.exclude entry {entry}") in vals for k, vals in entry.items())
               for entry in spec.exclude):
            continue
        name = run_name(cfg, point)
        if name in runs:  # e.g. full fine-tuning crossed with ranks: the rank does not change the run
            continue
        run_data["run_dir"] = str(Path(spec.output_dir) / spec.table / name)
        runs[name] = SweepRun(name=name, table=spec.table, point=point, cfg=_build_config(run_data, where, schema),
                              gpus=spec.gpus_per_run)
    return spec, list(runs.values())


# ----------------------------------------------------------------------------- running
def visible_devices(n: Optional[int]) -> List[str]:
    """The GPU ids to hand out, honouring an existing CUDA_VISIBLE_DEVICES (``n=None``: all of them).

    Raises:
        ValueError: more workers asked for than GPUs exist -- a worker given an absent GPU would
            see no CUDA at all and quietly train on the CPU.
    """
    count = torch.cuda.device_count()
    n = count if n is None else n
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(max(count, n))]
    if n > len(ids) or (count and n > count):
        raise ValueError(f"--gpus {n} but only {min(len(ids), count) if count else len(ids)} GPU(s) are visible"
                         + (f" (CUDA_VISIBLE_DEVICES={env!r})" if env else ""))
    if n and not count:
        print(f"[sweep] no CUDA device visible: the {n} parallel workers run on the CPU", flush=True)
    return ids[:n]


def build_data_once(runs: Sequence[SweepRun]) -> None:
    """Build each distinct task's data here before the workers start.

    Why: generated tasks (Darcy) write their cache on first use; parallel workers that all find an
    empty cache would each generate it and race on the files. Built once, they only read it.
    """
    seen = set()
    for run in runs:
        task = run.cfg.task
        if task.name not in DISK_CACHED_TASKS:
            continue
        key = repr((task.name, task.data_root, to_dict(task.options)))
        if key not in seen:
            seen.add(key)
            print(f"[sweep] preparing data of task {task.name} under {task.data_root}", flush=True)
            build_task(task.name, task.options, task.data_root)


def stage3_command(run: SweepRun) -> List[str]:
    """The subprocess that runs one sweep point: stage 3 on the run directory's own config.yaml,
    under torchrun (one process per GPU of its slot) when the run takes several GPUs."""
    stage3 = ["-m", "orca", "stage3", "--config", str(run.run_dir / "config.yaml")]
    if run.gpus > 1:
        # --standalone: a private rendezvous on a free port, so several DDP runs can share a host
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.gpus}", *stage3]
    return [sys.executable, *stage3]


def gpu_slots(devices: Sequence[str], gpus_per_run: int, per_gpu: int) -> List[str]:
    """The pool's slots, each a ``CUDA_VISIBLE_DEVICES`` value: consecutive groups of ``gpus_per_run``
    GPUs, each listed ``per_gpu`` times (a slot listed k times runs k runs at once).

    Raises:
        ValueError: fewer GPUs than one run needs (a DDP run missing a GPU would not start).
    """
    if gpus_per_run > len(devices):
        raise ValueError(f"sweep.gpus_per_run={gpus_per_run} but {len(devices)} GPU(s) are given to the sweep"
                         + ("" if devices else " (--gpus 0 runs in this process, one process per run)")
                         + f": show it at least {gpus_per_run} GPUs or set sweep.gpus_per_run=1")
    groups = [",".join(devices[i:i + gpus_per_run]) for i in range(0, len(devices) - gpus_per_run + 1, gpus_per_run)]
    if len(devices) % gpus_per_run:
        print(f"[sweep] {len(devices) % gpus_per_run} GPU(s) left idle: {len(devices)} is not a multiple of "
              f"sweep.gpus_per_run={gpus_per_run}", flush=True)
    return [group for group in groups for _ in range(per_gpu)]


def prepare(run: SweepRun, sweep_file: str, cli_overrides: Sequence[str]) -> None:
    """Write ``config.yaml`` (what the subprocess runs) and ``sweep.json`` into the run directory."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, run.run_dir / "config.yaml")
    write_json(run.run_dir / "sweep.json", run.record(sweep_file, cli_overrides))


def _mark_failed(run: SweepRun, trace: str) -> str:
    """Write the traceback to ``sweep_error.log`` and, for a run that began, a ``failed`` summary whose reason
    is the traceback's last line (a packed run fails inside the pack, where no stage-3 loop records it)."""
    log = run.run_dir / "sweep_error.log"
    log.write_text(trace)
    rundir = RunDir(run.run_dir)
    summary = rundir.read_summary()
    if isinstance(summary, dict) and summary.get("status") == "running":
        last = (trace.strip().splitlines() or ["unknown error"])[-1]
        rundir.write_summary({**{k: v for k, v in summary.items() if k != "status"}, "reason": last}, status="failed")
    return str(log)


def _run_in_process(pending: List[SweepRun], bar) -> List[Tuple[SweepRun, str]]:
    failed = []
    for run in pending:
        bar.set_postfix(run=run.name)
        (run.run_dir / "sweep_error.log").unlink(missing_ok=True)  # from an earlier failed attempt
        try:
            orca.train.run_stage3(run.cfg)
        except Exception:  # noqa: BLE001 - one broken run must not stop the sweep; it is reported at the end
            (run.run_dir / "sweep_error.log").write_text(traceback.format_exc())
            failed.append((run, str(run.run_dir / "sweep_error.log")))
            print(f"[sweep] FAILED {run.name}; traceback in {run.run_dir / 'sweep_error.log'}", flush=True)
        bar.update(1)
    return failed


def _run_packed(pending: List[SweepRun], k: int, bar, timing_file: Optional[str] = None,
                profile_file: Optional[str] = None) -> Tuple[List[Tuple[SweepRun, str]], List[SweepRun]]:
    """Train the packable runs in packs of up to ``k`` in this process (:mod:`orca.packed`); return
    the failed runs and the runs left to train alone (each alone run's reason is printed)."""
    packs, alone_idx = orca.packed.plan_packs([run.cfg for run in pending], k)
    for i, reason in alone_idx:
        print(f"[sweep] {pending[i].name} trains alone: {reason}", flush=True)
    alone = [pending[i] for i, _ in alone_idx]
    failed = []
    for n, members in enumerate(packs):
        pack = [pending[i] for i in members]
        bar.set_postfix(pack=f"{len(pack)} runs: {pack[0].name} ...")
        print(f"[sweep] pack of {len(pack)}: {', '.join(run.name for run in pack)}", flush=True)
        for run in pack:
            (run.run_dir / "sweep_error.log").unlink(missing_ok=True)  # from an earlier failed attempt
        try:
            result = orca.packed.train_pack([run.cfg for run in pack], profile_to=profile_file if n == 0 else None)
        except orca.packed.PackError as err:
            print(f"[sweep] these runs train alone: they cannot share a packed model ({err})", flush=True)
            alone.extend(pack)
            continue
        except Exception:  # noqa: BLE001 - one broken pack must not stop the sweep; reported at the end
            for run in pack:
                failed.append((run, _mark_failed(run, traceback.format_exc())))
            print(f"[sweep] FAILED pack of {len(pack)}; traceback in each run's sweep_error.log", flush=True)
            bar.update(len(pack))
            continue
        if timing_file:
            with open(timing_file, "a") as fh:
                fh.write(json.dumps({"runs": [run.name for run in pack], **result["timing"]}) + "\n")
        for run, error in zip(pack, result["errors"]):
            if error is not None:
                failed.append((run, _mark_failed(run, error + "\n")))
        bar.update(len(pack))
    return failed, alone


def _run_pool(pending: List[SweepRun], devices: List[str], bar, command: Callable[[SweepRun], List[str]],
              poll_s: float) -> List[Tuple[SweepRun, str]]:
    """One subprocess per slot from a shared queue; each writes ``sweep.log`` in its run directory.

    ``devices`` lists each slot's ``CUDA_VISIBLE_DEVICES`` (one GPU id, or several for a DDP run); a
    slot listed k times runs k runs on those GPUs at once.
    """
    processes = sum(len(dev.split(",")) for dev in devices)  # what shares the CPUs
    queue, active, failed = deque(pending), {}, []
    try:
        while queue or active:
            for slot, dev in enumerate(devices):
                if slot not in active and queue:
                    run = queue.popleft()
                    # cwd stays the caller's, so relative paths in the config mean what they meant here
                    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
                    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}  # one process per run
                    env.update(CUDA_VISIBLE_DEVICES=dev, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
                    # Concurrent runs each start a full-size intra-op thread pool by default; spinning
                    # pools oversubscribe the cores (a 3-per-GPU sweep ran its CPU-side data at 8 img/s).
                    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // processes)))
                    log = open(run.run_dir / "sweep.log", "ab")
                    proc = subprocess.Popen(command(run), env=env, stdout=log, stderr=subprocess.STDOUT)
                    active[slot] = (proc, run, log)
                    print(f"[sweep] GPU {dev}: {run.name}", flush=True)
            time.sleep(poll_s)
            for slot, (proc, run, log) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[slot]
                bar.update(1)
                if rc != 0 or not run.done:
                    failed.append((run, str(run.run_dir / "sweep.log")))
                    print(f"[sweep] FAILED {run.name} (exit {rc}); log: {run.run_dir / 'sweep.log'}", flush=True)
    finally:  # Ctrl-C or an error here: do not leave orphaned training processes on the GPUs
        for proc, _, log in active.values():
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def check_ownership(runs: Sequence[SweepRun], sweep_file: str) -> None:
    """Refuse run directories that another sweep file already wrote.

    Why: completion is "summary.json says finished", so two sweep files whose run names and ``sweep.table``
    coincide (say the same grid on another task) would silently take each other's results.

    Raises:
        ConfigError: naming the directory, the sweep that owns it and the way out.
    """
    for run in runs:
        record = run.run_dir / "sweep.json"
        if not record.is_file():
            continue
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # unreadable: prepare() rewrites it
        if not isinstance(owner, dict):
            continue
        mine = run.record(sweep_file, ())
        theirs = {k: owner.get(k) for k in ("sweep_file", "task")}
        if theirs != {k: mine[k] for k in theirs}:
            raise ConfigError(
                f"{run.run_dir} belongs to sweep {theirs['sweep_file']!r} (task {theirs['task']!r}), not to "
                f"{sweep_file!r} (task {mine['task']!r}): give this sweep its own sweep.table or sweep.output_dir")


def run_sweep(path: str | os.PathLike, overrides: Sequence[str] = (), gpus: Optional[int] = None,
              dry_run: bool = False, command: Callable[[SweepRun], List[str]] = stage3_command,
              poll_s: float = 2.0, per_gpu: int = 1, pack: int = 0,
              pack_timing: Optional[str] = None, only: Optional[Sequence[str]] = None,
              pack_profile: Optional[str] = None,
              schema: Type[ExperimentConfig] = ExperimentConfig) -> List[Tuple[SweepRun, str]]:
    """Run every pending point of a sweep; return the failed runs with the path of their log.

    Args:
        path: sweep YAML.
        overrides: dotted overrides (``sweep.*`` edit the sweep section; others apply to every run).
        gpus: GPUs to use (``None``: all visible), one run each, or ``sweep.gpus_per_run`` each. 0 runs
            sequentially in this process (CPU, or a GPU the runs find by themselves).
        dry_run: only print each run's status and directory.
        command: the subprocess command of one run (tests substitute a cheap one).
        per_gpu: concurrent runs per GPU (small, launch-bound models leave most of a GPU idle).
        pack: above 0, train up to ``pack`` runs at a time in this process through one shared body
            (:mod:`orca.packed`); runs that cannot pack then run as without it.
        pack_timing: a file to append each pack's time split to (one JSON line per pack).
        pack_profile: a file for the first pack's ``torch.profiler`` table of a few steps.
        poll_s: how often the worker pool checks its subprocesses.
        schema: as :func:`load_sweep`.
        only: run names to restrict the sweep to (a Slurm array task's share); None: all of them.
    """
    spec, runs = load_sweep(path, overrides, schema)
    check_ownership(runs, str(path))
    if only is not None:
        runs = select_runs(runs, only, str(path))
    pending = [r for r in runs if not r.done]
    print(f"[sweep] {path}: {len(runs)} runs in {Path(spec.output_dir) / spec.table}, "
          f"{len(runs) - len(pending)} done, {len(pending)} pending", flush=True)
    if dry_run:
        for run in runs:
            print(f"  {'done   ' if run.done else 'pending'}  {run.run_dir}", flush=True)
        return []
    if per_gpu < 1:
        raise ValueError(f"per_gpu must be >= 1, got {per_gpu}")
    if pack < 0:
        raise ValueError(f"pack must be >= 0, got {pack}")
    devices = visible_devices(gpus)
    if spec.gpus_per_run > 1:
        devices = gpu_slots(devices, spec.gpus_per_run, per_gpu)
    else:
        devices = [dev for dev in devices for _ in range(per_gpu)]
    for run in pending:
        prepare(run, str(path), overrides)
    with Progress(total=len(pending), desc="sweep", unit="run") as bar:
        failed = []
        if pack:  # packs build their data in this process, one after the other
            failed, pending = _run_packed(pending, pack, bar, pack_timing, pack_profile)
        if devices and pending:
            build_data_once(pending)
        if pending and not devices:
            failed += _run_in_process(pending, bar)
        elif pending:
            failed += _run_pool(pending, devices, bar, command, poll_s)
    return failed


def select_runs(runs: Sequence[SweepRun], names: Sequence[str], sweep_file: str) -> List[SweepRun]:
    """The runs named in ``names``, in sweep order.

    Raises:
        ConfigError: a name the sweep does not have (the file changed since the array was written).
    """
    by_name = {run.name: run for run in runs}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ConfigError(f"{sweep_file} has no run named {', '.join(missing)}; `bash scripts/sweep.sh {sweep_file} "
                          f"--dry-run` lists its runs (regenerate the Slurm script after editing the sweep)")
    wanted = set(names)
    return [run for run in runs if run.name in wanted]


def add_pool_arguments(parser: argparse.ArgumentParser, gpus: str, per_gpu: str, pack: str) -> None:
    """The arguments a sweep and its Slurm array share (the sweep file, overrides, GPUs, runs per GPU,
    packing, ``--debug``), with each command's own help for the three that mean something per command."""
    parser.add_argument("sweep", help="sweep YAML (configs/experiments/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run; sweep.KEY=VALUE edits the sweep")
    parser.add_argument("--gpus", type=int, default=None, help=gpus)
    parser.add_argument("--per-gpu", type=int, default=1, help=per_gpu)
    parser.add_argument("--pack", type=int, default=0, metavar="K", help=pack)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too (or ORCA_DEBUG=1)")


def check_pool_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the values of :func:`add_pool_arguments`' options that cannot be meant (usage error, exit 2)."""
    if args.gpus is not None and args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")
    if args.per_gpu < 1:
        parser.error(f"--per-gpu must be >= 1, got {args.per_gpu}")
    if args.pack < 0:
        parser.error(f"--pack must be >= 1 (or 0: off), got {args.pack}")


def main(argv: Optional[Sequence[str]] = None, schema: Type[ExperimentConfig] = ExperimentConfig,
         prog: str = "python -m orca sweep") -> int:
    """The sweep command line (``python -m orca sweep`` passes the full schema): a config mistake ends
    in one ``error:`` line (exit 2), not a traceback."""
    return exit_on_error(lambda args: _main(args, schema, prog), argv)


def _main(argv: List[str], schema: Type[ExperimentConfig], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pool_arguments(parser, gpus="parallel runs, one GPU each (default: all visible; 0 = sequential in this process)",
                       per_gpu="concurrent runs on each GPU (default 1; more for small, launch-bound models)",
                       pack="train up to K runs at a time in one process through one shared frozen body "
                            "(LoRA and head runs; others train as without it)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")
    parser.add_argument("--pack-timing", default=None, metavar="FILE",
                        help="with --pack: append each pack's time split (setup, steps, evaluation, checkpoints) "
                             "to FILE as one JSON line")
    parser.add_argument("--pack-profile", default=None, metavar="FILE",
                        help="with --pack: write a torch.profiler table of a few steps of the first pack to FILE")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                        help="run only these runs of the sweep (a Slurm array task's share, orca/slurm.py)")
    args = parser.parse_intermixed_args(argv)
    check_pool_arguments(parser, args)
    only = [name for name in args.only.split(",") if name] if args.only is not None else None
    failed = run_sweep(args.sweep, args.overrides, gpus=args.gpus, dry_run=args.dry_run, per_gpu=args.per_gpu,
                       pack=args.pack, pack_timing=args.pack_timing, only=only,
                       pack_profile=args.pack_profile, schema=schema)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed:", file=sys.stderr)
        for run, log in failed:
            print(f"  {run.name}: {log}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print("[sweep] all runs complete", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("error: run sweeps with `python -m orca sweep ...`, which knows every stage's config sections")
