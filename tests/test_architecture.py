"""The import graph of the product packages: layers, stages, cycles, imports inside functions.

The layers, lowest first (an import may only point down, or stay inside its own package):

    datasets, ibp          import nothing of ours (and not each other)
    orca (core)            config schema, registry, model, bodies, adapters, align, train, runs
    rank_estimation        stage 2: builds on orca core and ibp
    orca.cli, orca.__main__, scripts   the entry points: the only code that knows every stage

On top of the layers: no stage module reaches another stage module through its imports (the
helpers they share live in orca.runtime, orca.optimization and orca.evaluation), the graph has no
cycle, and no function imports one of our modules (an import inside a function is how a cycle
hides). Functions may import only the optional third-party packages of one code path.

The checker is plain functions over a ``{module: [Edge]}`` graph, tested first on small synthetic
graphs that break each rule, so a checker that found nothing could not pass for a clean tree.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets", "ibp", "orca", "rank_estimation", "scripts")
ENTRY_POINTS = ("orca.cli", "orca.__main__")
#: The stage modules: each runs one stage and none may reach another (only the entry points do).
STAGES = ("orca.pretrain", "orca.align.loop", "rank_estimation.stage", "orca.train")
#: Third-party modules a function may import (a name covers its submodules): optional (bitsandbytes
#: needs CUDA, peft is a test reference) or slow to import and used by one code path (plots, a
#: reference solver, microsoft/otdd's checkout loaded by location, a file format, TensorBoard
#: logging, the compiler's mode table).
OPTIONAL_IMPORTS = frozenset({"bitsandbytes", "peft", "matplotlib", "ot", "geomloss", "otdd", "sklearn", "skimage",
                              "scipy", "h5py", "torchvision", "threadpoolctl", "torch.utils.tensorboard",
                              "torch._inductor"})


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (a module name) at ``line``; ``in_function``: inside a def."""

    source: str
    target: str
    line: int
    in_function: bool


def layer(module: str) -> int:
    """0 datasets/ibp, 1 orca core, 2 rank_estimation, 3 entry points and scripts; -1 not ours."""
    top = module.split(".")[0]
    if module in ENTRY_POINTS or top == "scripts":
        return 3
    return {"datasets": 0, "ibp": 0, "orca": 1, "rank_estimation": 2}.get(top, -1)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_imports(path: Path, module: str, known: Set[str]) -> List[Edge]:
    """Every import statement of ``path``: module level and inside functions (at any depth).

    ``from a import b`` points at ``a.b`` when that is a module of ours, else at ``a``; relative
    imports are resolved against ``module``. Imports of other code keep their full dotted name.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    edges: List[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    edges.append(Edge(module, _ours_or_top(alias.name, known), child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package[:len(package) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    edges.append(Edge(module, full if full in known else _ours_or_top(base, known),
                                      child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return edges


def _ours_or_top(name: str, known: Set[str]) -> str:
    """The longest prefix of ``name`` that is a module of ours, else ``name`` itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return name


def build_graph(root: Path, packages: Iterable[str] = PACKAGES) -> Dict[str, List[Edge]]:
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    return {mod: parse_imports(path, mod, set(files)) for mod, path in files.items()}


def layer_violations(graph: Dict[str, List[Edge]]) -> List[str]:
    """Edges between our modules that point up a layer, or sideways into another package."""
    bad = []
    for edges in graph.values():
        for e in edges:
            if e.target not in graph:
                continue
            src, dst = layer(e.source), layer(e.target)
            same_package = e.source.split(".")[0] == e.target.split(".")[0] and src == dst
            if dst > src or (dst == src and not same_package and src < 3):
                bad.append(f"{e.source}:{e.line} imports {e.target} (layer {src} -> {dst})")
    return bad


def function_level_violations(graph: Dict[str, List[Edge]],
                              allowed: Iterable[str] = OPTIONAL_IMPORTS) -> List[str]:
    """Imports inside functions of anything but the allowed optional third-party packages."""
    allowed = tuple(allowed)

    def optional(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in allowed)

    return [f"{e.source}:{e.line} imports {e.target} inside a function"
            for edges in graph.values() for e in edges
            if e.in_function and (e.target in graph or not optional(e.target))]


def reachable(graph: Dict[str, List[Edge]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        for e in graph.get(todo.pop(), ()):
            if e.target in graph and e.target not in seen:
                seen.add(e.target)
                todo.append(e.target)
    return seen


def stage_violations(graph: Dict[str, List[Edge]], stages: Iterable[str] = STAGES) -> List[str]:
    """Stage modules from which another stage module is reachable."""
    stages = [s for s in stages if s in graph]
    return [f"stage {s} reaches stage {t}" for s in stages for t in stages
            if t != s and t in reachable(graph, s)]


def cycles(graph: Dict[str, List[Edge]]) -> List[List[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            w = e.target
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(e.target == v for e in graph[v]):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


# ----------------------------------------------------------------------------- the checker itself
def _graph(edges: Dict[str, List[str]], in_function: Optional[Set[tuple]] = None) -> Dict[str, List[Edge]]:
    in_function = in_function or set()
    return {src: [Edge(src, dst, i + 1, (src, dst) in in_function) for i, dst in enumerate(dsts)]
            for src, dsts in edges.items()}


def test_checker_flags_imports_against_the_layers():
    graph = _graph({
        "datasets.registry": ["orca.registry"],          # bottom layer importing orca core
        "ibp.gibbs": ["datasets.registry"],               # one bottom package importing the other
        "orca.registry": [],
        "orca.config": ["rank_estimation.config", "orca.registry"],   # core importing stage 2
        "rank_estimation.config": ["orca.registry", "ibp.gibbs"],     # fine: down the layers
        "orca.cli": ["rank_estimation.config", "orca.config"],        # fine: the entry point
        "scripts.tables": ["orca.cli"],                               # fine: top layer
    })
    assert sorted(layer_violations(graph)) == [
        "datasets.registry:1 imports orca.registry (layer 0 -> 1)",
        "ibp.gibbs:1 imports datasets.registry (layer 0 -> 0)",
        "orca.config:1 imports rank_estimation.config (layer 1 -> 2)",
    ]


def test_checker_finds_cycles_and_stage_to_stage_paths():
    graph = _graph({
        "orca.adapters.config": ["orca.adapters.lora"],
        "orca.adapters.lora": ["orca.adapters.qlora"],
        "orca.adapters.qlora": ["orca.adapters.lora"],    # lora <-> qlora
        "orca.runs": ["orca.runs"],                       # a module importing itself
        "orca.pretrain": ["orca.helpers"],
        "orca.helpers": ["orca.train"],                   # stage 0 reaches stage 3 through a helper
        "orca.train": ["orca.runs"],
    })
    assert cycles(graph) == [["orca.adapters.lora", "orca.adapters.qlora"], ["orca.runs"]]
    assert stage_violations(graph, ("orca.pretrain", "orca.train")) == ["stage orca.pretrain reaches stage orca.train"]
    clean = _graph({"a.x": ["a.y"], "a.y": [], "orca.pretrain": ["a.y"], "orca.train": ["a.y"]})
    assert cycles(clean) == [] and stage_violations(clean, ("orca.pretrain", "orca.train")) == []


def test_checker_parses_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "orca"
    (pkg / "adapters").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapters" / "__init__.py").write_text("from .lora import inject\n")
    (pkg / "adapters" / "lora.py").write_text(
        "import torch\nfrom orca import runs\n\n"
        "def inject():\n    from orca.adapters.qlora import NF4\n    import bitsandbytes.functional\n    import json\n"
        "    from torch.utils import tensorboard\n")
    (pkg / "adapters" / "qlora.py").write_text("from . import lora\n")
    (pkg / "runs.py").write_text("")
    graph = build_graph(tmp_path, ("orca",))
    assert {(e.source, e.target, e.in_function) for e in graph["orca.adapters.lora"]} == {
        ("orca.adapters.lora", "torch", False), ("orca.adapters.lora", "orca.runs", False),
        ("orca.adapters.lora", "orca.adapters.qlora", True),
        ("orca.adapters.lora", "bitsandbytes.functional", True), ("orca.adapters.lora", "json", True),
        ("orca.adapters.lora", "torch.utils", True)}
    assert graph["orca.adapters"][0].target == "orca.adapters.lora"
    assert sorted(function_level_violations(graph)) == [  # bitsandbytes is optional; torch.utils is not
        "orca.adapters.lora:5 imports orca.adapters.qlora inside a function",
        "orca.adapters.lora:7 imports json inside a function",
        "orca.adapters.lora:8 imports torch.utils inside a function"]
    assert cycles(graph) == [["orca.adapters.lora", "orca.adapters.qlora"]]


# ----------------------------------------------------------------------------- the product
@pytest.fixture(scope="module")
def product_graph() -> Dict[str, List[Edge]]:
    graph = build_graph(REPO)
    assert {"orca.config", "orca.cli", "rank_estimation.stage", "ibp.gibbs", "datasets.registry"} <= set(graph)
    return graph


def test_imports_follow_the_layers(product_graph):
    assert layer_violations(product_graph) == []


def test_no_import_cycles(product_graph):
    assert cycles(product_graph) == []


def test_no_stage_reaches_another(product_graph):
    assert all(s in product_graph for s in STAGES)
    assert stage_violations(product_graph) == []


def test_functions_import_only_optional_packages(product_graph):
    assert function_level_violations(product_graph) == []
