"""A small AST mutator for `deco.optimized` (tests/MUTATION.md); a tool, not a test module.

Each mutant changes one site of a module: an arithmetic operator (+ -, * /, ** -> *, // -> *,
% -> //), a comparison (< <=, > >=, == !=, is / is not, in / not in), `and` / `or`, a constant
(int n -> n + 1, float x -> x / 2 or 0.0 -> 1.0, True / False), a dropped unary minus or `not`, or
a dropped keyword argument of a call (its default takes over). Annotations, docstrings, imports,
`raise` and `assert` statements are left alone. The mutant is written with `ast.unparse`.

    python tests/mutation/mutate.py list FILE              # index, line, description per site
    python tests/mutation/mutate.py apply FILE INDEX OUT   # write mutant INDEX of FILE to OUT
"""

from __future__ import annotations

import ast
import sys

BINARY: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
    ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv,
}
COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
BOOLEAN: dict[type[ast.boolop], type[ast.boolop]] = {ast.And: ast.Or, ast.Or: ast.And}

Site = tuple[int, int, str]  # (index, line, description)


def changed_constant(value: object) -> object | None:
    """The mutated constant, or None for constants that are not mutated (strings, None, ...)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 1.0 if value == 0.0 else value * 0.5
    return None


class Mutator(ast.NodeTransformer):
    """Numbers the mutation sites in visiting order and applies the one numbered `target`
    (None: applies nothing, only lists the sites in `found`)."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.found: list[Site] = []

    def _hit(self, node: ast.AST, description: str) -> bool:
        index = len(self.found)
        self.found.append((index, getattr(node, "lineno", 0), description))
        return index == self.target

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        # defaults and body only: no annotations, no decorators
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [None if d is None else self.visit(d) for d in node.args.kw_defaults]
        node.body = [self.visit(statement) for statement in node.body]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def leave_alone(self, node: ast.AST) -> ast.AST:
        return node

    visit_Raise = visit_Assert = visit_Import = visit_ImportFrom = leave_alone

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node  # a docstring
        return self.generic_visit(node)

    def visit_If(self, node: ast.If) -> ast.AST:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        new = BINARY.get(type(node.op))
        if new and self._hit(node, f"{type(node.op).__name__}->{new.__name__}"):
            node.op = new()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        new = BINARY.get(type(node.op))
        if new and self._hit(node, f"aug {type(node.op).__name__}->{new.__name__}"):
            node.op = new()
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for k, op in enumerate(node.ops):
            new = COMPARE.get(type(op))
            if new and self._hit(node, f"{type(op).__name__}->{new.__name__}"):
                node.ops[k] = new()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        new = BOOLEAN[type(node.op)]
        if self._hit(node, f"{type(node.op).__name__}->{new.__name__}"):
            node.op = new()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.Not)) and self._hit(node, f"drop {type(node.op).__name__}"):
            return node.operand
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        new = changed_constant(node.value)
        if new is not None and self._hit(node, f"const {node.value!r}->{new!r}"):
            return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        for k, keyword in enumerate(list(node.keywords)):
            if keyword.arg is not None and self._hit(node, f"drop kwarg {keyword.arg}="):
                node.keywords = node.keywords[:k] + node.keywords[k + 1:]
                break
        return node


def sites(source: str) -> list[Site]:
    """Every mutation site of a module's source."""
    mutator = Mutator(None)
    mutator.visit(ast.parse(source))
    return mutator.found


def mutant(source: str, index: int) -> tuple[str, str]:
    """(the source of mutant `index`, its description)."""
    mutator = Mutator(index)
    tree = ast.fix_missing_locations(mutator.visit(ast.parse(source)))
    return ast.unparse(tree) + "\n", mutator.found[index][2]


if __name__ == "__main__":
    if sys.argv[1] == "list":
        with open(sys.argv[2]) as f:
            for index, line, description in sites(f.read()):
                print(index, line, description)
    else:
        with open(sys.argv[2]) as f:
            code, description = mutant(f.read(), int(sys.argv[3]))
        with open(sys.argv[4], "w") as f:
            f.write(code)
        print(description)
