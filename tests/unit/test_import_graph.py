"""The import graph of walletq has no cycle, and services/ stands below the edges.

Every import counts, a lazy one inside a function too: a cycle is a module that cannot be
understood, or loaded, without the one that needs it.
"""

from __future__ import annotations

import subprocess
import sys

import grimp

PACKAGES = ("services", "worker", "tasks")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_project_has_no_import_cycle() -> None:
    graph = grimp.build_graph(*PACKAGES)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert _cycles(graph) == [["a", "b", "c"]]


def test_services_import_no_edge_module() -> None:
    graph = grimp.build_graph(*PACKAGES)
    for module in graph.find_children("services") | {"services"}:
        for imported in graph.find_modules_directly_imported_by(module):
            assert imported.split(".")[0] == "services", f"{module} imports {imported}"


def test_importing_every_module_reads_no_setting_and_makes_no_folder(tmp_path) -> None:
    """The Celery app object exists at import; its configuration is read on first use."""
    home = tmp_path / "home"
    script = (
        "import importlib, pkgutil\n"
        "for pkg in ('services', 'worker', 'tasks'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "import celeryconfig, worker.celery_app as w\n"
        "assert not w.app.configured, 'the app read its configuration at import'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "WALLETQ_HOME": str(home),
           "WALLETQ_FEE_RATE": "not a number"}  # read at import, this would fail
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not home.exists()
