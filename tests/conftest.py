"""Shared fixtures: a tiny Swin, tiny Darcy options, a stand-in model, and the gpu marker's auto-skip."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Subprocesses the tests start (python scripts/x.py, python -m orca) find this checkout's packages
# the way scripts/_env.sh gives them to the stage scripts, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest-xdist worker per core: a second intra-op thread per worker only
    # contends (spin-waiting) for the core the other worker uses, and the subprocesses tests start
    # (python scripts/x.py, torchrun) inherit the same limit. Tests that set their own keep theirs.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def prereg_shell(call: str, pilots_dir: Optional[Path] = None) -> str:
    """Run ``call`` in bash after sourcing scripts/_prereg.sh (reproduce.sh's pre-registration
    bookkeeping), from the repo root with a bare PATH; its stdout."""
    env = {"PATH": "/usr/bin:/bin", **({"PILOTS_DIR": str(pilots_dir)} if pilots_dir is not None else {})}
    done = subprocess.run(["bash", "-c", f"source scripts/_prereg.sh; {call}"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout


def load_script(filename: str, name: Optional[str] = None) -> ModuleType:
    """Import ``scripts/<filename>`` as a module (the scripts are not a package), freshly each call.
    It is registered in ``sys.modules`` under ``name`` (default: the file's stem), which dataclasses
    defined in a script need."""
    name = name or Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


TINY_BODY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}


class Stand(nn.Module):
    """Stand-in for ORCAModel (embedder -> body -> head), for adapter tests on arbitrary bodies."""

    def __init__(self, embedder, body, head):
        super().__init__()
        self.embedder, self.body, self.head = embedder, body, head

    def forward(self, x):
        return self.head(self.body(self.embedder(x)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: 1 thread avoids OpenMP spin-waiting on a busy 2-core machine (50x measured).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _nf4_cpu_reason():
    """Why the CPU tests cannot quantise their tiny Linears to NF4 here (None if they can): no
    working bitsandbytes, or one whose CPU kernel reads blocks that span rows of W back wrongly
    (seen with bitsandbytes 0.50.2 on an AVX-512 CPU; quantize_linears refuses such layers)."""
    from orca.adapters.qlora import quantize_linears

    torch.manual_seed(0)
    try:
        quantize_linears(nn.Sequential(nn.Linear(16, 32)), torch.float32)
    except RuntimeError as err:
        return str(err)
    return None


NF4_CPU_REASON = _nf4_cpu_reason()
#: CPU tests that quantise tiny Linears (in_features < 64) with bitsandbytes
needs_nf4_cpu = pytest.mark.skipif(NF4_CPU_REASON is not None, reason=f"no NF4 on this CPU: {NF4_CPU_REASON}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # under pytest-xdist (--dist loadgroup) the GPU tests share one worker: one at a time on the
        # device, as their timings and memory checks assume
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.xdist_group("gpu"))
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make a whole stage-3 run take seconds on one CPU core."""
    return tiny_overrides_under(tmp_path)


def tiny_overrides_under(tmp_path):
    """:func:`tiny_overrides` with outputs and data under ``tmp_path`` (for module-scoped fixtures)."""
    return [
        "name=test", f"output_dir={tmp_path / 'runs'}", f"task.data_root={tmp_path / 'data'}",
        "task.name=darcy", "task.options.resolution=41", "task.options.subsample=4",
        "task.options.n_train=24", "task.options.n_val=8", "task.options.n_test=8", "task.options.workers=1",
        "model.body=swin_tiny_patch4_window7_224", "model.weights=none", "model.img_size=32",
        "model.body_kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 2}",
        "train.epochs=2", "train.warmup_epochs=0.5", "train.batch_size=8", "train.device=cpu",
        "train.deterministic=true", "train.log_every=1", "adapter.method=full",
    ]
