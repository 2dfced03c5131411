"""The environment: our `datasets/` package must be the one Python imports, never HF's."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import datasets

REPO = Path(__file__).resolve().parents[1]


def test_datasets_is_this_repository():
    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"
    assert hasattr(datasets, "register_task") and "darcy" in datasets.TASKS


def test_hf_datasets_is_not_installed_and_is_blocked():
    """Outside the checkout, `datasets` is absent or (after `pip install -e .`) this repository's."""
    isolated = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; s = u.find_spec('datasets'); "
                               "print(s.origin if s else None)"], capture_output=True, text=True, cwd="/")
    found = isolated.stdout.strip()
    assert found == "None" or Path(found).resolve() == REPO / "datasets" / "__init__.py", \
        f"a 'datasets' package is installed: {found}"
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


def test_the_package_is_installable_and_scripts_do_not_edit_sys_path():
    """pyproject declares a build, the four packages and `orca` = `python -m orca`; the scripts import
    the installed package (or the checkout on PYTHONPATH, as scripts/_env.sh sets it)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert meta["project"]["scripts"] == {"orca": "orca.cli:main"}
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["orca*", "rank_estimation*", "ibp*", "datasets*"]
    assert [p.name for p in sorted((REPO / "scripts").glob("*.py")) if "sys.path" in p.read_text()] == []
    assert "PYTHONPATH=" in (REPO / "scripts" / "_env.sh").read_text()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "kernel_budget.py"), "--help"], cwd="/",
                          capture_output=True, text=True, timeout=300)  # PYTHONPATH from tests/conftest.py
    assert done.returncode == 0 and "usage: kernel_budget.py" in done.stdout, done.stderr
