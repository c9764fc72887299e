"""The import graph keeps the architecture: no cycles among the project's modules, and no upward imports
(tessera/, the library every program shares, imports no daemon; the sidecar does not import the issuer;
inside the issuer, core <- datastore <- services <- api <- app <- main).

Every import counts, at module level or inside a function, except those only for type checkers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tessera", "issuer", "agent_sidecar")
GENERATED = ("tessera.v1.", "tessera.workload.")  # protoc output, not ours to arrange


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = module_name(path)
            if not name.startswith(GENERATED):
                mods[name] = path
    return mods


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a name imported from a package counts as its module if it is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    def top(name: str) -> str:
        return name.split(".")[0]
    return sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
                  if (top(mod) == "tessera" and top(dep) in ("issuer", "agent_sidecar"))
                  or (top(mod) == "agent_sidecar" and top(dep) == "issuer"))


def test_the_project_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_shared_library_imports_no_daemon_and_the_sidecar_not_the_issuer():
    assert upward_imports(import_graph()) == []


def layering_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Within the issuer, dependencies point one way: core/ depends on nothing of the issuer; the datastore
    on core/ and the audit relay only; the API handlers are wired by app.py alone, and app.py by main.py."""
    def breach(mod: str, dep: str) -> bool:
        if not (mod.startswith("issuer.") and dep.startswith("issuer.")):
            return False
        if mod.startswith("issuer.core.") or mod == "issuer.audit.relay":
            return not dep.startswith("issuer.core.")
        if mod.startswith("issuer.datastore"):
            return not (dep.startswith(("issuer.core.", "issuer.datastore")) or dep == "issuer.audit.relay")
        if dep.startswith("issuer.api."):
            return not (mod.startswith("issuer.api.") or mod == "issuer.app")
        return dep == "issuer.app" and mod != "issuer.main"
    return sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps if breach(mod, dep))


def test_the_issuer_layers_depend_one_way():
    assert layering_breaches(import_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    # The checks themselves can fail: a cycle, an upward import and a lazy import inside a function are found.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert {"issuer.ca.authorities", "tessera.safefs"} <= graph["issuer.app"]
    planted = tmp_path / "planted.py"
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import issuer.cli\n"
                       "def later():\n    from issuer.app import build\n    import agent_sidecar.main\n")
    deps = imports_of(planted, project_modules())
    assert deps == {"issuer.app", "agent_sidecar.main"}
    assert upward_imports({**graph, "tessera.planted": deps}) == [
        "tessera.planted -> agent_sidecar.main", "tessera.planted -> issuer.app"]
    assert layering_breaches({**graph, "issuer.core.models": {"issuer.datastore.interface"},
                              "issuer.revocation.service": {"issuer.api.admin", "issuer.app"}}) == [
        "issuer.core.models -> issuer.datastore.interface", "issuer.revocation.service -> issuer.api.admin",
        "issuer.revocation.service -> issuer.app"]
