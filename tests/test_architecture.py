"""The import graph has no cycles, module by module (ARCHITECTURE.md).

`lint-imports` (pyproject.toml's ``[tool.importlinter]``) checks the layers and, with its
``acyclic_siblings`` contract, cycles between sibling packages and modules. That contract does
not see a cycle between a package's ``__init__`` and one of its own submodules; this test
does: it walks grimp's graph (import-linter's, imports inside functions included) and fails
naming the cycle.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("pipeline_lib", "tasks", "flows")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


def _cycles(graph: grimp.ImportGraph, package: str) -> list[tuple[str, ...]]:
    """One cycle (a closed chain of modules) through each import m -> n between modules of
    ``package`` from which an import chain leads back to m."""
    inside = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    found = []
    for module in sorted(inside):
        for imported in sorted(graph.find_modules_directly_imported_by(module) & inside):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                found.append((module, *back))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(graph, package):
    cycles = _cycles(graph, package)
    assert not cycles, f"import cycles in {package}:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_detection_names_the_cycle():
    """The check above would see a cycle, including one through a package's __init__."""
    g = grimp.ImportGraph()
    for m in ("pkg", "pkg.a", "pkg.b", "other"):
        g.add_module(m)
    g.add_import(importer="pkg", imported="pkg.a")
    g.add_import(importer="pkg.a", imported="pkg.b")
    g.add_import(importer="pkg.b", imported="pkg")
    g.add_import(importer="other", imported="pkg")
    assert ("pkg", "pkg.a", "pkg.b", "pkg") in _cycles(g, "pkg")
    assert _cycles(g, "other") == []
