"""The project's module graph: no import cycles, no oversized modules.

Every module under protocol/, server/, consumers/ and clients/ is parsed (not
imported) with ``ast``. An import counts wherever it is written, at module
level or inside a function, except under ``if TYPE_CHECKING:`` (those run only
for the type checker). A cycle means two modules cannot be understood, tested
or replaced one without the other; a module over ``MAX_LINES`` lines in
server/ or consumers/ holds more than one concern (DESIGN.md: "Modules stay
small").
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "server", "consumers", "clients")
SIZE_CHECKED = ("server", "consumers")
MAX_LINES = 450

# Known exceptions, each being reshaped on its own branch: empty these sets as
# those changes land. The tests below also fail when an entry is no longer
# needed, so that the sets only ever shrink.
KNOWN_OVERSIZE = {
    "server/store/mongodb.py",
}
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, skipping TYPE_CHECKING blocks
    (their ``else:`` branch still runs, so it is kept)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_in(other)
            continue
        yield from _imports_in(child)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module ``name`` imports: for ``import a.b``
    and ``from a import b``, the most specific module that exists."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target

    found = set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b`: the submodule a.b if there is one, else a.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else resolve(base)
                for alias in node.names
            ]
        found.update(t for t in targets if t and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_of_every_kind() -> None:
    graph = import_graph()
    assert "server.settings" in graph["server.cli"]  # module level, absolute
    assert "server.store.sqlite" in graph["server.store"]  # inside a function, relative
    assert "server.store.sqlite_writes" in graph["server.store.sqlite"]  # `from . import x`
    assert "consumers.registry" in graph["consumers.builtin"]  # a name from a module


def test_each_name_of_one_import_counts(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text("from server import metrics, broker\nfrom server.store import Store\n")
    known = {"server", "server.metrics", "server.broker", "server.store"}
    found = imported_modules("server.mod", path, known)
    assert found == {"server.metrics", "server.broker", "server.store"}


def test_type_checking_imports_are_left_out() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import server.metrics\n"
        "if TYPE_CHECKING:\n"
        "    from server.app import Server\n"
        "def f():\n"
        "    from server import broker\n"
    )
    tree = ast.parse(source)
    names = [getattr(n, "module", None) or n.names[0].name for n in _imports(tree)]
    assert names == ["typing", "server.metrics", "server"]


def test_no_import_cycles() -> None:
    found = set(cycles(import_graph()))
    unexpected = sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert not unexpected, f"import cycles: {unexpected}"
    stale = sorted(sorted(c) for c in KNOWN_CYCLES - found)
    assert not stale, f"no longer cycles, remove them from KNOWN_CYCLES: {stale}"


def test_no_oversized_modules() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in module_files().values()
        if path.relative_to(ROOT).parts[0] in SIZE_CHECKED
    }
    over = {name for name, lines in sizes.items() if lines > MAX_LINES}
    unexpected = {name: sizes[name] for name in sorted(over - KNOWN_OVERSIZE)}
    assert not unexpected, f"modules over {MAX_LINES} lines: {unexpected}"
    stale = sorted(KNOWN_OVERSIZE - over)
    assert not stale, f"no longer over {MAX_LINES} lines, remove from KNOWN_OVERSIZE: {stale}"
