"""Progress of long loops, readable on a terminal and in a log file alike.

On a terminal (stderr is a TTY) a :class:`Progress` is a tqdm bar. Redirected to a file or a pipe, a
tqdm bar either disappears (``disable=None``) or floods the log with carriage returns; there a
:class:`Progress` instead prints one plain line at a steady interval, from a background timer, so
that a loop whose single step takes minutes still reports, and a last line when it ends::

    [stage1 otdd] 3/20 epochs (15%), 0.042 epochs/s, ETA 6m44s, elapsed 1m11s; objective=0.1183

The interval is ``ORCA_PROGRESS_S`` seconds (default 30; tests use a tiny one); ``ORCA_PROGRESS_S=0``
turns the lines off. Every stage (0-3) and the data generators use this one helper; it lives in the
lowest package because ``datasets`` imports nothing of ours.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm.auto import tqdm

INTERVAL_ENV = "ORCA_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    """Seconds between progress lines when stderr is not a terminal (``ORCA_PROGRESS_S``, default 30)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL_S
    except ValueError:
        value = DEFAULT_INTERVAL_S
    return value if value == value and value >= 0 else DEFAULT_INTERVAL_S  # nan / negative: the default


def duration(seconds: float) -> str:
    """``71.3`` -> ``1m11s``; ``4000`` -> ``1h06m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """A progress report for ``total`` units of work (tqdm's ``update`` / ``set_postfix`` / ``close``).

    Args:
        total: units of work (None: unknown, no percentage or ETA).
        desc: what runs, e.g. ``"epoch 2/10"``.
        unit: the unit's name (``"batch"``, ``"sample"``).
        initial: units already done (a resumed epoch), not counted in the rate.
        enabled: False shows nothing (DDP ranks other than 0).
        leave: keep the terminal bar when done.
        stream: where to write (default stderr); its ``isatty()`` picks bar or lines.
        interval: seconds between lines (default :func:`interval_s`).
        lines: False for a loop that logs its own progress lines (stage 0): then only the terminal bar.
    """

    def __init__(self, total: Optional[float] = None, desc: str = "", unit: str = "it", initial: float = 0,
                 enabled: bool = True, leave: bool = True, stream: Optional[TextIO] = None,
                 interval: Optional[float] = None, lines: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.postfix = ""
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval_s() if interval is None else interval
        self.t0 = time.monotonic()
        self._bar = None
        self._stop: Optional[threading.Event] = None
        if not enabled:
            return
        if _isatty(self.stream):
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=leave,
                             file=self.stream)
        elif lines and self.interval > 0:
            self._stop = threading.Event()
            threading.Thread(target=self._tick, name=f"progress {desc}", daemon=True).start()

    # ------------------------------------------------------------------ tqdm's interface
    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the rate, e.g. ``loss=0.12`` (formatted as given)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._stop is not None:  # the last line, for a loop that ran long enough to report at all
            self._stop.set()
            self._stop = None
            if time.monotonic() - self.t0 >= self.interval:
                print(self.line() + " (done)", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ lines
    def line(self) -> str:
        """The current state as one line: count, percentage, rate, ETA, elapsed, postfix."""
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = f"{_num(self.n)}/{_num(self.total)} {self.unit}" if self.total else f"{_num(self.n)} {self.unit}"
        parts = [count + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{rate:.3g} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.n, 0) / rate)}")
        parts.append(f"elapsed {duration(elapsed)}")
        return f"[{self.desc}] " + ", ".join(parts) + (f"; {self.postfix}" if self.postfix else "")

    def _tick(self) -> None:
        stop = self._stop
        while stop is not None and not stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)


def progress(iterable: Iterable, total: Optional[float] = None, **kwargs: Any) -> Iterator:
    """``for x in progress(items, desc=...)``: a :class:`Progress` over an iterable (closed at the end)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _num(x: Optional[float]) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
