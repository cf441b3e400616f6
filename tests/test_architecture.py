"""The package's shape: who may import whom, no import cycle, one concept per module.

The rule that makes the privacy claim checkable -- a site never runs coordinator code, the coordinator
never sees a row -- is an import rule: ``site/`` and ``coordinator/`` import only ``model/``,
``likelihood/`` and ``protocol`` (and ``errors``), never each other, ``methods/``, ``api`` or ``cli``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedglmm"
LEAVES = {"fedglmm.errors"}            # importable from anywhere (it imports nothing of the package)
ALLOWED = {                            # package -> what its modules may import besides themselves
    "fedglmm.model": set(),
    "fedglmm.likelihood": {"fedglmm.model"},
    "fedglmm.protocol": set(),
    "fedglmm.site": {"fedglmm.model", "fedglmm.likelihood", "fedglmm.protocol"},
    "fedglmm.coordinator": {"fedglmm.model", "fedglmm.likelihood", "fedglmm.protocol"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# functions allowed to be longer, each with the reason (keep this list short)
LONG_FUNCTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedglmm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fedglmm"):
                continue
            for alias in node.names:                  # `from . import x` may name a submodule
                sub = f"{mod}.{alias.name}"
                out.add(sub if sub in MODULES else mod)
    return {m for m in out if m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _owner(name: str) -> str | None:
    return next((pkg for pkg in ALLOWED if name == pkg or name.startswith(pkg + ".")), None)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _owner(n)))
def test_import_rules(name):
    own = _owner(name)
    allowed = ALLOWED[own] | {own} | LEAVES
    bad = sorted(m for m in GRAPH[name] if not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not bad, f"{name} imports {bad}; {own} may import only {sorted(ALLOWED[own])}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH.get(n, ())):
            if m not in GRAPH:
                continue
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)


def test_the_rule_test_can_fail():
    """The checker sees a breach: the coordinator importing the site would be flagged."""
    own = _owner("fedglmm.coordinator.rounds")
    assert not any("fedglmm.site.site" == a or "fedglmm.site.site".startswith(a + ".")
                   for a in ALLOWED[own] | {own} | LEAVES)
    assert "fedglmm.coordinator.schema" in GRAPH["fedglmm.coordinator.rounds"]   # relative imports resolve


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_a_docstring_and_is_short(name):
    path = MODULES[name]
    text = path.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{name} has no docstring"
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: {len(text.splitlines())} lines"


def test_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long.append(f"{key} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)
