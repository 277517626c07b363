"""The package's layout: no import circle between vse_cuda's modules (function-local imports
included: they close a circle the first time the function runs; ``importlib.import_module``
calls are not read) and no file over the size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vse_cuda"
MAX_LINES = 450


def module_name(path: Path, root: Path) -> str:
    """``root/a/b.py`` -> ``vse_cuda.a.b``; a package's ``__init__.py`` is the package itself."""
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every module of the package under ``root`` -> the package modules it imports, anywhere in
    its body. Importing ``a.b.c`` runs ``a.b``'s ``__init__`` first, so the target's enclosing
    packages count too, except those enclosing the importer (already being imported)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from X import y`` imports the module X.y when there is one, else takes y from X.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != name and (i == len(parts) or not name.startswith(prefix + ".")):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_circle_check_sees_local_relative_and_package_imports(tmp_path):
    """The checker itself: a circle closed by a function-local import, one through a subpackage's
    ``__init__``, and the imports that close none."""
    pkg = write_package(tmp_path / "vse_cuda", {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n\ndef f():\n    from .c import g\n",
        "b.py": "from ._x import y\n",
        "_x.py": "",
        "c.py": "def g():\n    from .a import f\n",
    })
    assert import_graph(pkg)["vse_cuda.a"] == {"vse_cuda.b", "vse_cuda.c"}
    assert find_cycle(import_graph(pkg)) == ["vse_cuda.a", "vse_cuda.c", "vse_cuda.a"]
    (pkg / "c.py").write_text("def g():\n    import math\n    from .b import y\n")
    assert find_cycle(import_graph(pkg)) is None

    write_package(pkg, {
        "ops/__init__.py": "from .t import h\n",
        "ops/t.py": "from .._x import y\nfrom . import u\n",
        "ops/u.py": "",
    })
    graph = import_graph(pkg)
    assert graph["vse_cuda.ops"] == {"vse_cuda.ops.t"} and graph["vse_cuda.ops.t"] == {"vse_cuda._x", "vse_cuda.ops.u"}
    assert find_cycle(graph) is None
    (pkg / "_x.py").write_text("from vse_cuda.ops.u import z\n")  # runs ops/__init__, which imports _x
    assert find_cycle(import_graph(pkg)) == ["vse_cuda._x", "vse_cuda.ops", "vse_cuda.ops.t", "vse_cuda._x"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_file_over_the_line_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (limit {MAX_LINES}): split it"
