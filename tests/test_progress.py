"""Progress that survives redirection: plain lines at a steady interval with rate and ETA when stderr is
not a terminal (no carriage returns), a tqdm bar only on a terminal; stages and data generation use it."""
from __future__ import annotations

import io
import re
import time

import pytest

from datasets.progress import Progress, duration, interval_s
from orca.config import load_config
from orca.train import run_stage3

LINE = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[\d.e+-]+) (?P=unit)/s(, ETA (?P<eta>\w+))?, elapsed \w+")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_at_a_steady_interval_with_rate_and_eta():
    out = io.StringIO()
    bar = Progress(total=40, desc="gen", unit="sample", stream=out, interval=0.05)
    for _ in range(8):
        time.sleep(0.03)
        bar.update(1)
    bar.set_postfix(loss="0.5")
    time.sleep(0.08)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 3 <= len(lines) <= 9, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    mid = parsed[-2]
    # about 8 samples in 0.3 s: the rate is near 27/s and the ETA covers the remaining 32 samples
    assert mid["n"] == "8" and mid["pct"] == "20" and 10 < float(mid["rate"]) < 40 and mid["eta"] is not None
    assert lines[-2].endswith("; loss=0.5") and lines[-1].endswith(" (done)")
    n_lines = len(lines)
    time.sleep(0.12)
    assert len(out.getvalue().splitlines()) == n_lines  # closed: the timer stopped


def test_terminal_gets_a_bar_and_disabled_gets_nothing():
    term = Terminal()
    with Progress(total=3, desc="t", stream=term, interval=0.01) as bar:
        bar.update(3)
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()
    quiet = io.StringIO()
    with Progress(total=3, desc="q", stream=quiet, interval=0.01, enabled=False) as bar:
        time.sleep(0.05)
        bar.update(3)
    assert quiet.getvalue() == ""


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ORCA_PROGRESS_S", "2.5")
    assert interval_s() == 2.5
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv("ORCA_PROGRESS_S", bad)
        assert interval_s() == 30.0
    monkeypatch.delenv("ORCA_PROGRESS_S")
    assert interval_s() == 30.0
    assert [duration(s) for s in (5, 71.3, 4000)] == ["5s", "1m11s", "1h06m"]


def test_stage3_and_data_generation_log_lines_not_carriage_returns(tiny_overrides, monkeypatch, capfd):
    monkeypatch.setenv("ORCA_PROGRESS_S", "0.001")  # every loop reports at least its last line
    run_stage3(load_config(None, tiny_overrides + ["train.epochs=2", "adapter.method=head"]))
    err = capfd.readouterr().err
    assert "\r" not in err
    descs = {m["desc"] for m in map(LINE.match, err.splitlines()) if m}
    assert {"epoch 1/2", "epoch 2/2", "val", "test"} <= descs, descs
    assert any(d.startswith("darcy train ") for d in descs), descs  # the generator of the task's data
