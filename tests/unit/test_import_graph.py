"""The import arrows of ARCHITECTURE.md, checked on the source: no cycle between medfed's
modules (imports inside functions count too: a lazy import that closes a cycle is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("client", "server", "privacy")


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the medfed modules it imports. ``from pkg import sub`` is an arrow to the
    submodule ``pkg.sub`` when there is one, else to ``pkg``."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sources else node.module
                           for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in sources and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _sources() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return out


def test_no_import_cycle_between_medfed_modules() -> None:
    assert cycles(import_graph(_sources())) == []


def test_the_cycle_finder_finds_the_cycle_there_was() -> None:
    """server.cli and server.deploy_cli imported each other (the latter lazily): that is a cycle."""
    before = {"server.cli": "from server.deploy_cli import register\n",
              "server.deploy_cli": "def run():\n    from server.cli import round_table\n",
              "server.console": "", "client.dicom": "from client.dicom.reader import parse\n",
              "client.dicom.reader": "from client.dicom import header\n", "client.dicom.header": ""}
    assert cycles(import_graph(before)) == [["server.cli", "server.deploy_cli"]]
