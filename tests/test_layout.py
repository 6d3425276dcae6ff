"""The package's import graph, read from the installed sources with `ast` (every import, also those
inside functions): no circle between files, and no import that runs up a floor.

The floors, from the ground up (README "Layout"): spec constants and error types; the release
format; the two implementations of the spec; shared ground (data, outputs, checkpoints,
distributed); `generate`; the wings (evaluate, text, deploy, conformance, diffusers); training;
the command line. A module may import its own floor or any floor below it, never above."""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

FLOORS: list[tuple[str, ...]] = [
    ("deco", "deco.config", "deco.errors", "deco.atomic", "deco.portable", "deco.safe_load", "deco.extras",
     "deco.paths_inside", "deco.untrusted"),
    ("deco.release",),
    ("deco.reference", "deco.optimized"),
    ("deco.outputs", "deco.output_policy", "deco.plan_identity", "deco.data", "deco.distributed",
     "deco.checkpoint", "deco.lora"),
    ("deco.generate",),
    ("deco.evaluate", "deco.text", "deco.deploy", "deco.conformance", "deco.diffusers", "deco.vectors"),
    ("deco.train",),
    ("deco.cli",),
]


def floor_of(module: str) -> int:
    """The floor of a module: that of the longest prefix listed in FLOORS."""
    best, depth = -1, -1
    for level, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = level, name.count(".")
    assert best >= 0, f"{module} is on no floor: add it to FLOORS and to the README's layout table"
    return best


def package_modules() -> dict[str, Path]:
    """Every module of deco, deco.reference and deco.optimized, by dotted name -> source file
    (works for an installed package and for an editable install of the checkout alike)."""
    modules: dict[str, Path] = {}
    for package in ("deco", "deco.reference", "deco.optimized"):
        folder = Path(importlib.import_module(package).__file__ or "").parent
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "deco" and parts and parts[0] in ("reference", "optimized"):
                continue  # an installed package nests them: read once, as their own package
            modules[name] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports (at module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in modules else base)
    return {m for m in out if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_graph_is_read(graph: dict[str, set[str]]) -> None:
    # the reader must see what it checks: imports inside functions, relative and absolute ones
    assert "deco.optimized.frequency" in graph["deco.optimized.trainer"]  # relative
    assert "deco.train.job" in graph["deco.cli.train"]  # inside the command's handler
    assert len(graph) > 60


def test_no_import_runs_up_a_floor(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if floor_of(b) > floor_of(a))
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def test_no_circle_between_files(graph: dict[str, set[str]]) -> None:
    cycles = strongly_connected(graph)
    assert not cycles, f"import circles: {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each is a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    edges = defaultdict(set, graph)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_circles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_readme_layout_table_names_every_module() -> None:
    """README "Layout": the row of each folder of core/ names every module in it (in backticks)."""
    from helpers import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `core/")}
    missing = []
    for folder in sorted({p.parent for p in (REPO_ROOT / "core").rglob("*.py")}):
        key = folder.relative_to(REPO_ROOT).as_posix() + "/"
        assert key in rows, f"README's layout table has no row for {key}"
        for module in sorted(folder.glob("*.py")):
            if module.stem not in ("__init__", "__main__") and f"`{module.stem}`" not in rows[key]:
                missing.append(f"{key}{module.name}")
    assert not missing, f"modules the README's layout table does not name: {missing}"
