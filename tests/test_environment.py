"""The environment: our `datasets/` package must be the one Python imports, never HF's."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[1]


def test_datasets_is_this_repository():
    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"
    assert hasattr(datasets, "register_task") and "darcy" in datasets.TASKS


def test_hf_datasets_is_not_installed_and_is_blocked():
    isolated = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; print(u.find_spec('datasets'))"],
                              capture_output=True, text=True, cwd="/")
    assert isolated.stdout.strip() == "None", f"a 'datasets' package is installed: {isolated.stdout}"
    assert "datasets<0" in (REPO / "constraints.txt").read_text()


def test_pins_agree_between_requirements_and_environment_yml():
    pins = {l.split("==")[0].lower(): l.split("==")[1] for l in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in l and not l.startswith("#")}
    env = (REPO / "environment.yml").read_text().lower()
    for name, version in pins.items():
        assert f"{name}=={version}" in env, f"environment.yml lacks {name}=={version}"
    for name in ("torch", "torchvision"):
        assert importlib.util.find_spec(name) is not None
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
