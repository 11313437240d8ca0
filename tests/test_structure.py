"""The package layers of ``src/lmlab`` import only downward, and no modules import each other.

Every ``import`` statement is read from the source (function-level ones included), so a lazy
import cannot hide an upward dependency or a cycle.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"

LAYERS = [
    ("errors",),
    ("files", "catalog"),
    ("config",),
    ("ops", "data"),
    ("layers",),
    ("model",),
    ("eval",),
    ("distributed",),
    ("train",),
    ("posttrain", "interop", "memory"),
    ("serve", "experiments"),
    ("cli",),
    ("__main__",),
    ("lmlab",),
]
"""Bottom to top; the packages on one row never import each other. ``lmlab`` is the package's
own ``__init__``: it only installs the ``transformers`` registration hook of ``interop``."""

RANK = {name: rank for rank, row in enumerate(LAYERS) for name in row}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The lmlab modules ``path`` imports (``from lmlab.x import y`` counts as ``lmlab.x.y`` when
    that is a module, else ``lmlab.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lmlab"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmlab"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {name: _imports(path) & set(MODULES) for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES if m != "lmlab"}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    here = _package(module)
    for target in GRAPH[module]:
        there = _package(target)
        if there == "lmlab" or there == here:
            continue
        assert RANK[there] < RANK[here], f"{module} imports {target}: {there} is not below {here}"


def test_no_import_cycles():
    """Depth-first search over the module graph; a back edge is a cycle."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checks_see_lazy_imports(tmp_path):
    """A function-level import is an import: the parser finds it."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lmlab.train import trainer\n", encoding="utf-8")
    assert "lmlab.train.trainer" in _imports(source)
