"""Run directories: where every stage writes its config, metrics, checkpoints and summary.

Layout of one run (``runs/{stage}__{task}__{name}__s{seed}__{time}/``)::

    config.yaml      the fully resolved config (repeat the run from this file alone)
    metrics.jsonl    one JSON object per epoch / evaluation, appended as the run goes
    summary.json     ``status``: ``running`` (with host and pid), ``failed`` (with the reason), or
                     ``finished`` with the final facts: git commit, machine, wall time, img/s, metrics
    tb/              TensorBoard scalars
    ckpt/last.pt     resume point (atomic write, loads with weights_only=True)
    ckpt/best.pt     best-by-validation weights

A stage-3 checkpoint leaves out a frozen body that the run's config rebuilds (a weights file or the
hub) and keeps a digest of it instead (:mod:`orca.model_state`). Checkpoints are written to a
temporary file and renamed, so a run killed while saving keeps its previous checkpoint; they are read with ``torch.load(weights_only=True)``, so loading a file never
executes pickled code.

Nothing earlier is lost when a run cannot start: a stage first reads and checks everything it resumes
from, then writes its start (``config.yaml`` and the ``running`` summary) in one step
(:meth:`RunDir.begin`: every file is written to a temporary, and only when all were written are they
renamed into place); rows of ``metrics.jsonl`` that a resume supersedes are dropped only when the first
new row is written. A temporary file left by a killed write is removed when the next run starts there.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from orca.errors import OrcaError, reading

REPO_ROOT = Path(__file__).resolve().parents[1]


class CheckpointMismatch(OrcaError, ValueError):
    """A checkpoint was saved from a model with other parameter names or shapes."""


def git_info() -> Dict[str, Any]:
    """Commit and dirty flag of the code that runs (``unknown`` outside a git checkout).

    Read once per process, at the first call: a run makes that call when its run directory is made
    (:class:`RunDir`), before any work, so a run that takes an hour reports the commit it started
    from, not one made in the checkout while it ran (its summaries are written at the end).
    ``ORCA_GIT_COMMIT`` overrides both (dirty = False): for machines that receive a copy of a clean,
    committed tree without its current history (e.g. a GPU machine sent only the working tree),
    where ``git`` would report whatever stale ``.git`` happens to be there.
    """
    return dict(_git_at_first_call())


@functools.lru_cache(maxsize=None)
def _git_at_first_call() -> Dict[str, Any]:
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


_TEMP = re.compile(r"\..+\.tmp(\d+)")


def _temp_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half.

    A failed write (a full disk, an exception in ``write``) removes the temporary and leaves ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_of(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_together(files: Dict[Path, bytes]) -> None:
    """Write several files so that either all of them change or none does (short of a crash between renames).

    Every temporary is written first; only when all were written are they renamed into place. A failed
    write removes the temporaries and leaves every file as it was.
    """
    temps = {path: _temp_of(path) for path in files}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path].write_bytes(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()


def remove_stale_temps(directory: Path) -> List[Path]:
    """Delete temporaries that a killed write left in ``directory`` and its subdirectories (other processes')."""
    removed = []
    for path in Path(directory).rglob(".*.tmp*"):
        m = _TEMP.fullmatch(path.name)
        if m and int(m.group(1)) != os.getpid() and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def save_png(fig, path: Path) -> None:
    """Lay out, atomically write and close a matplotlib figure (closed: stages draw many plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=_jsonable) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_bytes(Path(path), lambda tmp: Path(tmp).write_bytes(_json_bytes(data)))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def is_finished(summary: Any) -> bool:
    """Whether a ``summary.json``'s content is that of a finished run (not ``running`` nor ``failed``;
    summaries from before ``status`` existed were written only by finished runs)."""
    return isinstance(summary, dict) and summary.get("status", "finished") == "finished"


class RunDir:
    """One stage's run directory.

    Args:
        path: the directory (created if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        git_info()  # the commit this run starts from, before any work (see git_info)
        self._tb = None
        self._keep: Optional[Callable[[Dict[str, Any]], bool]] = None  # a resume's pending metrics filter

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
        """Append one JSON line to ``metrics.jsonl`` and mirror numeric values to TensorBoard.

        After :meth:`begin` with ``keep``, the first call rewrites the file without the rows that
        ``keep`` rejects (the rows a resume supersedes), with ``record`` appended, in one atomic write.
        """
        line = json.dumps(record, default=_jsonable) + "\n"
        if self._keep is not None:
            rows = "".join(json.dumps(r, default=_jsonable) + "\n" for r in self.read_metrics() if self._keep(r))
            atomic_write_bytes(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(rows + line))
            self._keep = None
        else:
            with open(self.path / "metrics.jsonl", "a") as fh:
                fh.write(line)
        step = record.get("step", record.get("epoch", 0))
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(key, value, step)

    def read_metrics(self) -> list:
        """The rows of ``metrics.jsonl``; a last line cut short (a run killed while appending it) is skipped."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            with reading(path, "the metrics log", "repair or delete the damaged line (one JSON object per line)"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise
        return rows

    def begin(self, config_text: str, facts: Dict[str, Any], keep: Optional[Callable[[Dict[str, Any]], bool]] = None) -> None:
        """Start (or resume) the run: ``config.yaml`` and a ``running`` summary, written together.

        Call it once everything the run resumes from was read and checked: a run that fails before
        leaves the directory as it was. It also removes temporaries left by a killed write.

        Args:
            config_text: the resolved config's YAML (the file is rewritten only when it differs).
            facts: what the running summary says besides ``status``, host and pid.
            keep: for a resume, which existing ``metrics.jsonl`` rows stay (those the checkpoint
                covers); the others are dropped by the first :meth:`log_metrics`, not now.
        """
        files = {self.path / "summary.json": _json_bytes({"status": "running", **facts, "host": socket.gethostname(),
                                                          "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})}
        config = self.path / "config.yaml"
        if not config.is_file() or config.read_text() != config_text:
            files[config] = config_text.encode()
        write_together(files)
        remove_stale_temps(self.path)
        self._keep = keep

    def read_summary(self) -> Optional[Dict[str, Any]]:
        """``summary.json`` (None if absent or unreadable)."""
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def finished(self) -> Optional[Dict[str, Any]]:
        """The summary of a finished run in this directory, else None."""
        summary = self.read_summary()
        return summary if is_finished(summary) else None

    @contextlib.contextmanager
    def failure_recorded(self, facts: Dict[str, Any]) -> Iterator[None]:
        """An exception escaping the block writes the ``failed`` summary (:meth:`record_failure`), then propagates."""
        try:
            yield
        except BaseException as err:
            self.record_failure(err, facts)
            raise

    def record_failure(self, err: BaseException, facts: Dict[str, Any]) -> None:
        """Best effort ``summary.json`` with ``status: failed`` and the reason; never raises (the disk may be full)."""
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        try:
            self.write_summary({**facts, "reason": reason, "host": socket.gethostname(), "pid": os.getpid()},
                               status="failed")
        except Exception:  # noqa: BLE001 - the original error is what the user must see
            pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        """TensorBoard scalar (the writer is created lazily, so runs that never log make no tb/)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        self._tb.add_scalar(tag, value, step)

    def write_summary(self, summary: Dict[str, Any], status: str = "finished") -> Path:
        """Atomically write ``summary.json`` with ``status`` first (``finished`` unless told)."""
        write_json(self.path / "summary.json", {"status": status, **summary})
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


class CheckpointWriter:
    """Checkpoints written by one background thread while training goes on.

    Why: a packed sweep (:mod:`orca.packed`) writes K runs' checkpoints at once (``last`` every
    epoch, ``best`` when validation improves), and serialising them to disk held the GPU idle.
    :meth:`save_many` takes a snapshot of the payloads' tensors (so training may change them), the
    thread writes each with :meth:`RunDir.save_checkpoint` (atomically, as a run alone does), in the
    order saved; :meth:`wait` returns once everything is on disk (before a checkpoint is read, and
    when training ends, whether it finishes or fails: :meth:`close`). At most one batch of writes
    is pending: :meth:`save_many` waits for the previous one after taking its own snapshot, so host
    memory holds at most two snapshots and a write error surfaces at the next save as itself.
    ``wait_s`` is the time callers spent waiting for writes (the part of checkpointing the
    background thread did not hide).
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        self._pending: List[Future] = []
        self.wait_s = 0.0

    def save(self, run_dir: RunDir, name: str, payload: Dict[str, Any]) -> None:
        self.save_many([(run_dir, name, payload)])

    def save_many(self, items: Sequence[Tuple[RunDir, str, Dict[str, Any]]]) -> None:
        """Queue ``(run directory, checkpoint name, payload)`` writes once those queued before are written.

        The snapshot is one copy per device and dtype of all the payloads' tensors together
        (:func:`host_snapshot`), not one per tensor: K runs' checkpoints hold thousands of small
        tensors, and each copy from a GPU waits for the device, which made checkpoints a tenth of a
        short packed sweep.

        Raises:
            the first error of an earlier write (nothing of this call is queued then).
        """
        tensors: List[torch.Tensor] = []
        shapes = [_map_tensors(payload, torch.Tensor, lambda t: tensors.append(t) or _Snapshot(len(tensors) - 1))
                  for _, _, payload in items]
        host = host_snapshot(tensors)
        self.wait()
        for (run_dir, name, _), shape in zip(items, shapes):
            self._pending.append(self._pool.submit(_write_owned, run_dir, name, shape, host))

    def wait(self) -> None:
        """Block until every checkpoint saved so far is written; re-raise the first write error."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        finally:
            self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def host_snapshot(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Host copies of ``tensors`` as they are now: views into one new host buffer per (device,
    dtype), filled by one concatenation and one transfer (a copy even where they already are)."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to("cpu")
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return out  # type: ignore[return-value]


class _Snapshot:
    """Where a payload's tensor was: its index among the tensors of one :func:`host_snapshot`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _map_tensors(obj: Any, kind: type, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with new dicts, lists and tuples and every instance of ``kind`` replaced by ``fn(it)``."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, kind, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, kind, fn) for v in obj)
    return obj


def _write_owned(run_dir: RunDir, name: str, shape: Any, host: List[torch.Tensor]) -> None:
    """Write a checkpoint whose tensors are :class:`_Snapshot` s of ``host``; each is cloned first,
    since ``torch.save`` writes a view's whole buffer (every run's tensors) rather than the view."""
    run_dir.save_checkpoint(name, _map_tensors(shape, _Snapshot, lambda s: host[s.index].clone()))


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
