"""The spec's argument tables and signatures, read from the markdown, against `deco.reference`.

Two things in spec/*.md are machine-checked here so that the documents and the code cannot drift:

- **Error tables.** A section whose heading names a function (`` `name(...)` ``) and that holds a
  table `| argument | requirement | error |` lists, per argument, the exception categories
  (`` `TypeError` ``, `` `ValueError` ``, or — for none) and the name the message starts with
  (``naming `x` ``). Every row must cover exactly the function's parameters, and for every
  category a row lists, the bad inputs below must raise it with a message starting `name:`; a
  category the spec omits must have no bad input here (so the table is complete and not padded).
- **Signatures.** Every backticked signature `` `name(a, b=1.0)` `` of a public reference
  function states its parameter names and defaults; they must equal the function's (and, for the
  parameters the spec names, the same-named function of `deco.optimized`).
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import REPO_ROOT

from deco import optimized as O
from deco import reference as R

SPEC = REPO_ROOT / "spec"
ERROR_TABLE_HEADER = re.compile(r"^\|\s*argument\s*\|\s*requirement\s*\|\s*error\s*\|\s*$")
SIGNATURE = re.compile(r"`(?:[\w.]+\.)?(\w+)\(([^`()]*(?:\([^`()]*\)[^`()]*)*)\)`")


@dataclass(frozen=True)
class Row:
    """One row of an error table: where it is, the function, the argument and what it promises."""

    where: str
    function: str
    argument: str
    errors: frozenset[str]
    name: str | None


def _sections() -> list[tuple[str, str, list[str]]]:
    """(file name, heading, body lines) for every heading of every spec document."""
    out: list[tuple[str, str, list[str]]] = []
    for path in sorted(SPEC.glob("*.md")):
        heading, body = "", []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                out.append((path.name, heading, body))
                heading, body = line, []
            else:
                body.append(line)
        out.append((path.name, heading, body))
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def error_table_rows() -> list[Row]:
    """Every row of every `| argument | requirement | error |` table under a function heading."""
    rows = []
    for doc, heading, body in _sections():
        match = re.search(r"`(\w+)\(", heading)
        for i, line in enumerate(body):
            if not ERROR_TABLE_HEADER.match(line):
                continue
            assert match, f"{doc}: an error table under a heading without a function: {heading}"
            for entry in body[i + 2:]:  # skip the header and the |---| line
                if not entry.startswith("|"):
                    break
                arg_cell, _, error_cell = _cells(entry)
                argument = re.fullmatch(r"`(\w+)`", arg_cell)
                assert argument, f"{doc}: the argument cell {arg_cell!r} is not one `name`"
                named = re.search(r"naming `(\w+)`", error_cell)
                errors = frozenset(re.findall(r"`(\w+Error)`", error_cell))
                assert errors or error_cell == "—", f"{doc}: unreadable error cell {error_cell!r}"
                assert bool(errors) == bool(named), f"{doc}: {error_cell!r} must name the argument"
                rows.append(Row(f"{doc} {heading.strip('# ')}", match.group(1), argument.group(1),
                                errors, named.group(1) if named else None))
    return rows


ROWS = error_table_rows()
MODULES = (R, R.flow, R.frequency, R.sampling, R.model, R.weights)


def reference_function(name: str) -> Callable[..., Any] | None:
    """The public function `name` of deco.reference or one of its modules, if there is one."""
    for module in MODULES:
        if not name.startswith("_") and callable(getattr(module, name, None)):
            return getattr(module, name)  # type: ignore[no-any-return]
    return None


# ------------------------------------------------------------------------- bad inputs per row
class _ZeroModel:
    """A velocity model with 3 real classes whose velocity is 0 (sampling returns the noise)."""

    config = SimpleNamespace(num_classes=3)

    def forward(self, x: Any, t: Any, y: Any) -> Any:
        return np.zeros_like(np.asarray(x, dtype=np.float64))


NOISE = np.zeros((2, 3, 4, 4))
LABELS = np.array([0, 3])


def _sample(**kwargs: Any) -> Any:
    args: dict[str, Any] = {"noise": NOISE, "labels": LABELS, "steps": 2}
    args.update(kwargs)
    return R.sample(_ZeroModel(), args.pop("noise"), args.pop("labels"), **args)


def _drop(labels: Any = (1, 2), uniform: Any = (0.1, 0.7), p: Any = 0.5, null_class: Any = 10) -> Any:
    return R.drop_labels(np.asarray(labels) if isinstance(labels, tuple) else labels,
                         np.asarray(uniform) if isinstance(uniform, tuple) else uniform, p, null_class)


Calls = dict[type[Exception], list[Callable[[], object]]]

#: (function, argument) -> {exception category: calls that must raise it naming the argument}
BAD: dict[tuple[str, str], Calls] = {
    ("sample", "noise"): {TypeError: [lambda: _sample(noise="image"), lambda: _sample(noise=None)],
                          ValueError: [lambda: _sample(noise=np.zeros((2, 3, 4))),
                                       lambda: _sample(noise=np.full((2, 3, 4, 4), np.nan))]},
    ("sample", "labels"): {TypeError: [lambda: _sample(labels=np.array([0.0, 1.0]))],
                           ValueError: [lambda: _sample(labels=np.array([0, 4])),
                                        lambda: _sample(labels=np.array([-1, 0])),
                                        lambda: _sample(labels=np.array([0]))]},
    ("sample", "steps"): {TypeError: [lambda: _sample(steps=2.0), lambda: _sample(steps=True)],
                          ValueError: [lambda: _sample(steps=0)]},
    ("sample", "guidance"): {TypeError: [lambda: _sample(guidance="2")],
                             ValueError: [lambda: _sample(guidance=np.nan)]},
    ("sample", "interval"): {TypeError: [lambda: _sample(interval="01"), lambda: _sample(interval=0.5),
                                         lambda: _sample(interval=(0.0, 0.5, 1.0))],
                             ValueError: [lambda: _sample(interval=(0.8, 0.2)),
                                          lambda: _sample(interval=(0.0, 1.5)),
                                          lambda: _sample(interval=(np.nan, 1.0))]},
    ("sample", "timeshift"): {TypeError: [lambda: _sample(timeshift="3")],
                              ValueError: [lambda: _sample(timeshift=0.0),
                                           lambda: _sample(timeshift=np.inf)]},
    ("sample", "solver"): {TypeError: [lambda: _sample(solver=3), lambda: _sample(solver=None)],
                           ValueError: [lambda: _sample(solver="rk4"), lambda: _sample(solver="Euler")]},
    ("sample", "exact_heun"): {},
    ("sample", "null"): {TypeError: [lambda: _sample(null=np.array([0.5, 0.5]), guidance=2.0)],
                         ValueError: [lambda: _sample(null=np.array([0]), guidance=2.0),
                                      lambda: _sample(null=np.array([0, 9]), guidance=2.0)]},
    ("sample", "order"): {TypeError: [lambda: _sample(solver="adams", order=2.0)],
                          ValueError: [lambda: _sample(solver="adams", order=0)]},
    ("time_grid", "steps"): {TypeError: [lambda: R.time_grid(2.0)], ValueError: [lambda: R.time_grid(0)]},
    ("time_grid", "timeshift"): {TypeError: [lambda: R.time_grid(2, "3")],
                                 ValueError: [lambda: R.time_grid(2, -1.0), lambda: R.time_grid(2, np.nan)]},
    ("time_shift", "t"): {TypeError: [lambda: R.time_shift("0.5"), lambda: R.time_shift(None)],
                          ValueError: [lambda: R.time_shift([1.5]), lambda: R.time_shift([np.nan]),
                                       lambda: R.time_shift(np.nextafter(1.0, 2.0))]},
    ("time_shift", "shift"): {TypeError: [lambda: R.time_shift(0.5, "2")],
                              ValueError: [lambda: R.time_shift(0.5, 0.0),
                                           lambda: R.time_shift(0.5, np.nan)]},
    ("drop_labels", "labels"): {TypeError: [lambda: _drop(labels=(1.0, 2.0))],
                                ValueError: [lambda: _drop(labels=np.array([[1, 2]])),
                                             lambda: _drop(labels=(1, 11)), lambda: _drop(labels=(-1, 2))]},
    ("drop_labels", "uniform"): {TypeError: [lambda: _drop(uniform=np.array(["a", "b"]))],
                                 ValueError: [lambda: _drop(uniform=(0.1,)),
                                              lambda: _drop(uniform=(0.1, 1.5)),
                                              lambda: _drop(uniform=(0.1, np.nan))]},
    ("drop_labels", "p"): {TypeError: [lambda: _drop(p="0.5")],
                           ValueError: [lambda: _drop(p=1.5), lambda: _drop(p=np.nan)]},
    ("drop_labels", "null_class"): {TypeError: [lambda: _drop(null_class=10.0)],
                                    ValueError: [lambda: _drop(null_class=0)]},
}

#: rows without an error ("—"): a call with an unusual but valid value of that argument
ACCEPTED: dict[tuple[str, str], Callable[[], object]] = {
    ("sample", "exact_heun"): lambda: _sample(solver="heun", exact_heun=1),
}


def test_the_spec_has_error_tables() -> None:
    functions = {row.function for row in ROWS}
    assert {"sample", "time_grid", "time_shift", "drop_labels"} <= functions
    assert {(row.function, row.argument) for row in ROWS} == set(BAD)


@pytest.mark.parametrize("function", sorted({row.function for row in ROWS}))
def test_each_table_lists_exactly_the_parameters(function: str) -> None:
    func = reference_function(function)
    assert func is not None, function
    params = set(inspect.signature(func).parameters) - {"model"}
    assert {row.argument for row in ROWS if row.function == function} == params


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.function}-{row.argument}")
def test_error_table_row(row: Row) -> None:
    calls = BAD[(row.function, row.argument)]
    assert {cls.__name__ for cls in calls} == set(row.errors), row.where
    for cls, bad in calls.items():
        for call in bad:
            with pytest.raises(cls, match=rf"^{row.name}:"):
                call()
    if not row.errors:
        ACCEPTED[(row.function, row.argument)]()


# ------------------------------------------------------------------------------- signatures
def spec_signatures() -> list[tuple[str, str, str]]:
    """(file, function name, parameter text) of every backticked signature with a default."""
    out = []
    for path in sorted(SPEC.glob("*.md")):
        for match in SIGNATURE.finditer(path.read_text(encoding="utf-8")):
            name, params = match.groups()
            # "..." abbreviates a signature given in full elsewhere: not a statement of it
            if "=" in params and "..." not in params and reference_function(name) is not None:
                out.append((path.name, name, params))
    return out


def _parse(params: str) -> list[tuple[str, Any]]:
    """[(name, default or inspect.Parameter.empty)] of a parameter list written like Python."""
    args = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True))
    pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    out = []
    for arg, node in pairs:
        if node is None or node is inspect.Parameter.empty:
            out.append((arg.arg, inspect.Parameter.empty))
        elif isinstance(node, ast.Name):  # a dtype written bare, e.g. dtype=float32
            out.append((arg.arg, getattr(np, node.id)))
        else:
            out.append((arg.arg, ast.literal_eval(node)))
    return out


SIGNATURES = spec_signatures()


def test_the_spec_states_the_defaults() -> None:
    names = {name for _, name, _ in SIGNATURES}
    assert {"sample", "time_grid", "time_shift", "logit_normal_time", "frequency_weights",
            "frequency_aware_loss", "heun"} <= names


@pytest.mark.parametrize(("doc", "name", "params"), SIGNATURES, ids=lambda v: str(v)[:40])
def test_signature_matches_the_reference(doc: str, name: str, params: str) -> None:
    spec = _parse(params)
    func = reference_function(name)
    assert func is not None
    got = [(p.name, p.default) for p in inspect.signature(func).parameters.values()]
    assert got == spec, f"{doc}: {name}"


@pytest.mark.parametrize(("doc", "name", "params"),
                         [s for s in SIGNATURES if hasattr(O, s[1])], ids=lambda v: str(v)[:40])
def test_signature_defaults_match_the_optimized(doc: str, name: str, params: str) -> None:
    """deco.optimized may add parameters (device, dtype, return_trajectory) but keeps the spec's
    names and defaults for the ones the spec lists."""
    got = {p.name: p.default for p in inspect.signature(getattr(O, name)).parameters.values()}
    for arg, default in _parse(params):
        assert arg in got and got[arg] == default, f"{doc}: {name}({arg})"
