"""The shape of the package, read from its source: the import graph has no
cycle, the pure modules reach nothing that does I/O, and the transport keeps
no state in module globals.

Every ``import`` and ``from ... import`` of a ``chatd`` module counts,
wherever it stands (inside a function, under ``TYPE_CHECKING``): an import
made late to dodge a cycle is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatd"

#: Modules documented as pure (docs/architecture.md): no I/O, no Trio.
PURE = [
    "chatd.errors",
    "chatd.protocol",
    "chatd.auth",
    "chatd.ratelimit",
    "chatd.content",
    "chatd.hub",
    "chatd.sequencer",
    "chatd.bus",
    "chatd.session",
    "chatd.store",
    "chatd.messages",
    "chatd.transport.frames",
    "chatd.transport.wire",
    "chatd.transport.fanout",
]
#: What a pure module may not reach, directly or through other chatd modules.
IO_MODULES = {
    "anyio",
    "asyncio",
    "coredis",
    "h11",
    "psycopg",
    "select",
    "selectors",
    "socket",
    "sqlite3",
    "subprocess",
    "threading",
    "trio",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(the chatd modules ``name`` imports, the top-level names of the
    others it imports)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours: set[str] = set()
    theirs: set[str] = set()

    def add(target: str) -> None:
        if target == "chatd" or target.startswith("chatd."):
            # the longest prefix that is a module of the package
            while target not in MODULES:
                target = target.rpartition(".")[0]
            if target != name:
                ours.add(target)
        else:
            theirs.add(target.partition(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in MODULES else base)
    return ours, theirs


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module
    (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v][0]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    """The reader sees the imports it must (else the checks below prove
    nothing)."""
    assert GRAPH["chatd.server"][0] >= {"chatd.hub", "chatd.handshake", "chatd.backends"}
    assert "chatd.transport.fanout" in GRAPH["chatd.transport.websocket"][0]
    assert "trio" in GRAPH["chatd.transport.websocket"][1]
    assert "chatd.cluster.bus" in GRAPH["chatd.backends"][0]  # imported inside a function


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycles() == []


def test_a_cycle_would_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: an edge back from the hub to the session closes a
    cycle, and it is reported."""
    ours, theirs = GRAPH["chatd.hub"]
    monkeypatch.setitem(GRAPH, "chatd.hub", ({*ours, "chatd.session"}, theirs))
    assert any({"chatd.hub", "chatd.session"} <= set(cycle) for cycle in _cycles())


def _reach(name: str) -> set[str]:
    seen = {name}
    todo = [name]
    while todo:
        for dep in GRAPH[todo.pop()][0]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_reach_no_io(name: str) -> None:
    reached = _reach(name)
    io = {(mod, lib) for mod in reached for lib in GRAPH[mod][1] & IO_MODULES}
    assert not io, f"{name} reaches I/O through {sorted(io)}"


def test_no_module_globals_in_the_transport() -> None:
    """Per-run state lives in an object the server owns (or a RunVar), never
    behind a ``global`` statement."""
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("chatd.transport"):
            tree = ast.parse(path.read_text(), str(path))
            offenders += [f"{name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert offenders == []
