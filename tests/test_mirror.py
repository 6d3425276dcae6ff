"""The mirror: spec chapter X <-> reference/X.py <-> optimized/X.py <-> tests/test_reference_X.py and
tests/test_optimized_X.py. Every public function or class of a reference module has its optimized
twin in the module of the same chapter, under the same name or named by that module's
`REFERENCE_TWINS` map; and spec/README.md's table names modules that exist."""

from __future__ import annotations

import importlib
import inspect
import re
from types import ModuleType

import pytest
from helpers import REPO_ROOT

CHAPTERS = ["checks", "flow", "frequency", "model", "sampling", "weights", "text_to_image"]


def public_definitions(module: ModuleType) -> list[str]:
    """Functions and classes defined in `module` itself (not imported into it), not _private."""
    return sorted(name for name, value in vars(module).items()
                  if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
                  and value.__module__ == module.__name__)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_reference_function_has_an_optimized_twin(chapter: str) -> None:
    ref = importlib.import_module(f"deco.reference.{chapter}")
    opt = importlib.import_module(f"deco.optimized.{chapter}")
    twins: dict[str, object] = getattr(opt, "REFERENCE_TWINS", {})
    missing = [name for name in public_definitions(ref) if not hasattr(opt, name) and name not in twins]
    assert not missing, f"deco.optimized.{chapter} has no twin (same name or REFERENCE_TWINS) for {missing}"
    for name, twin in twins.items():
        assert name in public_definitions(ref), f"REFERENCE_TWINS[{name!r}]: no such reference function"
        assert not hasattr(opt, name), f"REFERENCE_TWINS[{name!r}]: the module has the same name already"
        assert callable(twin), f"REFERENCE_TWINS[{name!r}] = {twin!r} is not callable"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_has_a_test_file_on_each_side(chapter: str) -> None:
    for side in ("reference", "optimized"):
        assert (REPO_ROOT / "tests" / f"test_{side}_{chapter}.py").is_file()


def test_the_twin_check_can_fail() -> None:
    ref = ModuleType("deco.reference.fake")
    exec("def spec_function(x):\n    return x\n", ref.__dict__)
    assert public_definitions(ref) == ["spec_function"]


def test_spec_readme_names_real_modules() -> None:
    table = (REPO_ROOT / "spec" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| [0")]
    assert len(rows) >= len(CHAPTERS)
    for row in rows:
        chapter_file = re.search(r"\(([0-9]{2}-[\w-]+\.md)\)", row)
        assert chapter_file and (REPO_ROOT / "spec" / chapter_file.group(1)).is_file(), row
        modules = re.findall(r"`(deco(?:\.\w+)+)`", row)
        assert modules, row
        for name in modules:
            importlib.import_module(name)  # raises for a module that does not exist


def test_readme_mirror_table_has_a_row_per_chapter() -> None:
    """README "Layout": one row per spec chapter, naming files that exist on both sides."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): line for line in readme.splitlines()
            if (m := re.match(r"\| `spec/([0-9]{2}-[\w-]+\.md)` \|", line))}
    chapters = sorted(p.name for p in (REPO_ROOT / "spec").glob("[0-9][0-9]-*.md"))
    assert sorted(rows) == chapters
    for chapter, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        for side, cell in (("reference", cells[1]), ("optimized", cells[2])):
            first = re.findall(r"`(\w+\.py)`", cell)[0]
            assert (REPO_ROOT / side / first).is_file(), (chapter, side, first)
        for test in re.findall(r"`(test_\w+\.py)`", cells[3]):
            assert (REPO_ROOT / "tests" / test).is_file(), (chapter, test)
