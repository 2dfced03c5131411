"""Run directories: where every stage writes its config, metrics, checkpoints and summary.

Layout of one run (``runs/{stage}__{task}__{name}__s{seed}__{time}/``)::

    config.yaml      the fully resolved config (repeat the run from this file alone)
    metrics.jsonl    one JSON object per epoch / evaluation, appended as the run goes
    summary.json     final facts: git commit, machine, wall time, img/s, parameters, metrics
    tb/              TensorBoard scalars
    ckpt/last.pt     resume point (atomic write, loads with weights_only=True)
    ckpt/best.pt     best-by-validation weights

Checkpoints are written to a temporary file and renamed, so a run killed while saving keeps its
previous checkpoint; they are read with ``torch.load(weights_only=True)``, so loading a file never
executes pickled code.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from orca.errors import OrcaError, reading

REPO_ROOT = Path(__file__).resolve().parents[1]


class CheckpointMismatch(OrcaError, ValueError):
    """A checkpoint was saved from a model with other parameter names or shapes."""


def git_info() -> Dict[str, Any]:
    """Commit and dirty flag of the code that runs (``unknown`` outside a git checkout).

    ``ORCA_GIT_COMMIT`` overrides both (dirty = False): for machines that receive a copy of a clean,
    committed tree without its current history (e.g. a GPU machine sent only the working tree),
    where ``git`` would report whatever stale ``.git`` happens to be there.
    """
    if os.environ.get("ORCA_GIT_COMMIT"):
        return {"commit": os.environ["ORCA_GIT_COMMIT"], "dirty": False, "source": "ORCA_GIT_COMMIT"}

    def _git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = _git("rev-parse", "HEAD") or "unknown"
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", None
    return {"commit": commit, "dirty": dirty}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or a job's share), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> Dict[str, Any]:
    """Host, CPU count, accelerator and library versions, for the summary of every run."""
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    return info


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(fig, path: Path) -> None:
    """Lay out, atomically write and close a matplotlib figure (closed: stages draw many plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_bytes(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunDir:
    """One stage's run directory.

    Args:
        path: the directory (created if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._tb = None

    @classmethod
    def create(cls, cfg, stage: str) -> "RunDir":
        """A new directory for ``stage`` under ``cfg.output_dir``, or ``cfg.run_dir`` when set."""
        if cfg.run_dir:
            return cls(cfg.run_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir) / f"{stage}__{cfg.task.name}__{cfg.name}__s{cfg.seed}__{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        return cls(path)

    # --- files -------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    def file(self, name: str) -> Path:
        return self.path / name

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and mirror numeric values to TensorBoard."""
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
        step = record.get("step", record.get("epoch", 0))
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(key, value, step)

    def read_metrics(self) -> list:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        with reading(path, "the metrics log", "repair or delete the damaged line (one JSON object per line)"):
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_metrics(self, keep) -> None:
        """Keep only metric records for which ``keep(record)`` is true (resume drops rows after the checkpoint)."""
        rows = [r for r in self.read_metrics() if keep(r)]
        atomic_write_bytes(self.path / "metrics.jsonl",
                           lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """TensorBoard scalar (the writer is created lazily, so runs that never log make no tb/)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        self._tb.add_scalar(tag, value, step)

    def write_summary(self, summary: Dict[str, Any]) -> Path:
        write_json(self.path / "summary.json", summary)
        return self.path / "summary.json"

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: Dict[str, Any]) -> Path:
        """Atomically save ``state`` (tensors, numbers, strings, lists, dicts only) as ``ckpt/{name}.pt``."""
        path = self.ckpt_dir / f"{name}.pt"
        atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
        return path

    def load_checkpoint(self, name: str) -> Optional[Dict[str, Any]]:
        """Load ``ckpt/{name}.pt`` without unpickling arbitrary objects (None if absent)."""
        path = self.ckpt_dir / f"{name}.pt"
        if not path.exists():
            return None
        with reading(path, "a checkpoint (truncated, or not a torch file)",
                     "delete it and run again, or start a new run"):
            return torch.load(path, map_location="cpu", weights_only=True)


def check_arch(saved: Dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatch` unless ``saved`` (name -> shape) matches ``model``."""
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    shape = [k for k in own if k in saved and list(saved[k]) != own[k]]
    if missing or extra or shape:
        parts = []
        if shape:
            parts.append(f"{len(shape)} tensors differ in shape, e.g. {shape[0]}: checkpoint {list(saved[shape[0]])} vs model {own[shape[0]]}")
        if missing:
            parts.append(f"{len(missing)} model tensors absent from it, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors, e.g. {extra[0]}")
        raise CheckpointMismatch(f"checkpoint {source} comes from a different model: " + "; ".join(parts))
