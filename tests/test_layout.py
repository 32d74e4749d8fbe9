"""The package's layout rules (DESIGN.md "Package layout"), checked by walking its source with ``ast``:

* no import cycles between the package's modules (module-level *and* function-level
  imports count: a function-level import hides a cycle, it does not remove it);
* no module uses another module's ``_private`` names (``from .x import _y``, ``x._y``);
* no file over 600 lines, no function over 80 lines.

Edges: ``from .x import name`` is an edge to ``x.name`` when that is a module, else to
``x``; the implicit import of parent packages is not an edge (every module has it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mozgach_mlx"
PACKAGE = "mozgach_mlx"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (``from ..x import y`` inside ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.AST):
    """Yield (target module, imported name or None, alias bound in this file, node)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE):
                    yield a.name, None, a.asname, node
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            if not src.startswith(PACKAGE):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES:
                    yield sub, None, a.asname or a.name, node
                else:
                    yield src, a.name, None, node


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, _, _, _ in _imports(m, ast.parse(path.read_text())):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses() -> list[str]:
    found = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, name, alias, node in _imports(m, tree):
            if name is not None and _private(name) and target != m:
                found.append(f"{m}:{node.lineno}: from {target} import {name}")
            if name is None and alias is not None and target != m:
                aliases[alias] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{m}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_walker_sees_the_package():
    # the checks below are only as good as the walk: it must find the modules and their edges
    graph = _graph()
    assert {"mozgach_mlx", "mozgach_mlx.trainer", "mozgach_mlx.models.llama"} <= set(graph)
    assert "mozgach_mlx.trainer" in graph["mozgach_mlx.fleet"]
    assert "mozgach_mlx.backend" in graph["mozgach_mlx"]


def test_cycle_and_private_detection_on_a_synthetic_graph():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _private("_get") and not _private("__version__") and not _private("load")


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_cross_module_private_names():
    assert _private_uses() == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    path = MODULES[name]
    lines = path.read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{path} has {lines} lines; split it along its seams"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject's explicit `packages` must name every package directory, or a wheel
    (not an editable install) silently lacks it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "mozgach_mlx").rglob("__init__.py")}
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"


def test_no_top_level_folder_shadows_an_installed_package():
    """From the repository root (the first sys.path entry of `python -c`, `python -m`
    and pytest), a top-level folder with an ``__init__.py`` is a regular package and wins
    over any installed package of that name: a top-level ``kernels/`` package made
    transformers 5 (which imports PyPI's ``kernels`` when torch is present) fail inside
    ``mz.load``. The only regular package at the top is ours; folders without an
    ``__init__.py`` are namespace portions, which never shadow an installed package."""
    repo = ROOT.parent
    packages = sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == [PACKAGE], packages
    modules = sorted(p.name for p in repo.glob("*.py"))
    assert modules == [], modules
