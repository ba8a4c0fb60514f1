"""The storage layer's import rules, checked on the source (ruff's PLC2701 does not flag private imports within
one's own package): the storage package, the URL module and the image reader import each other without cycles
(imports inside functions count too), and no module imports a private name of another module there, nor do they
import another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import embedfit

pytestmark = pytest.mark.fast

ROOT = Path(embedfit.__file__).parent
SCOPE = ("embedfit.storage", "embedfit.url", "embedfit.images")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _in_scope(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SCOPE)


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("embedfit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embedfit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from embedfit import url` imports a module, not a name
                found.append((sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno))
    return found


def test_no_module_imports_a_private_name_of_the_storage_layer_and_it_imports_none() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, imported, line in _imports(path, modules):
            private = imported.startswith("_") and not imported.startswith("__")
            if private and target != name and (_in_scope(name) or _in_scope(target)):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}.{imported}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_in_the_storage_layer() -> None:
    modules = _modules()
    graph = {name: {t for t, _, _ in _imports(path, modules) if _in_scope(t) and t != name}
             for name, path in modules.items() if _in_scope(name)}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join([*stack[stack.index(node):], node]))
            return
        for nxt in sorted(graph.get(node, ())):
            # `embedfit.storage` (the package) counts as a module: a storage module importing it is a cycle.
            visit(nxt, [*stack, node])

    for start in sorted(graph):
        visit(start, [])
    assert not cycles, "\n".join(sorted(set(cycles)))
    assert {"embedfit.storage.schema", "embedfit.storage.reader", "embedfit.url"} <= set(graph)


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from embedfit.storage.reader import _read_rows\n    from embedfit import url\n")
    modules = {"embedfit.url": Path("url.py")}
    assert _imports(source, modules) == [("embedfit.storage.reader", "_read_rows", 2), ("embedfit.url", "", 3)]
