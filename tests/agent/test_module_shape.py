"""The agent's modules: no import cycle among them, none much over 450 lines without a reason.

Imports are read from the source (what runs at import time; `if TYPE_CHECKING:` blocks do not
count). A module over the limit must say why at its top: its docstring holds
"Over 450 lines:" and the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "node-agent"
PACKAGE = "vmupdate_agent"
LIMIT = 450
# "About 450": a module may run a few lines over before it must be split or explained.
SLACK = 25
REASON = "Over 450 lines:"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module in known:
                    found.add(node.module)
                for alias in node.names:  # from vmupdate_agent import guard
                    if f"{node.module}.{alias.name}" in known:
                        found.add(f"{node.module}.{alias.name}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue  # imported when called, not when the module is
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit([n for n in inner if isinstance(n, ast.stmt)])

    visit(ast.parse(path.read_text()).body)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nimport x.a\nif TYPE_CHECKING:\n"
                   "    import x.b\ndef f():\n    import x.c\n")
    assert runtime_imports(src, {"x.a", "x.b", "x.c"}) == {"x.a"}


def test_no_import_cycle_among_the_agents_modules() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: runtime_imports(path, known) - {name} for name, path in mods.items()}
    assert graph[f"{PACKAGE}.operations"], "the import graph was not read"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_module_over_the_limit_without_a_reason() -> None:
    too_long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LIMIT + SLACK and REASON not in doc:
            too_long.append(f"{name}: {lines} lines")
    assert not too_long, ("split these modules or say why at their top "
                          f"('{REASON} ...'): {', '.join(too_long)}")


def test_the_journal_does_not_depend_on_the_wire() -> None:
    """The journal's on-disk record must not change when the proto does: neither the journal
    nor anything it imports at run time imports the wire adapter or the generated stubs."""
    mods = modules()
    wire = {f"{PACKAGE}.convert", "vmupdate_api.gen", "vmupdate_api.gen.agent_v1_pb2",
            "vmupdate_api.gen.agent_v1_pb2_grpc"}
    known = set(mods) | wire
    seen, todo = set(), [f"{PACKAGE}.journal"]
    while todo:
        name = todo.pop()
        if name in seen or name not in mods:
            continue
        seen.add(name)
        todo.extend(runtime_imports(mods[name], known))
    assert f"{PACKAGE}.specs" in seen, f"the import graph was not read: {sorted(seen)}"
    users = sorted(n for n in seen if runtime_imports(mods[n], known) & wire)
    assert not users, f"the journal depends on the wire through {users}"


def test_the_edges_call_the_engine_never_the_modes() -> None:
    """The servicer and the CLI reach the engine through operations (one way in: the same
    admission, VM lock, journal and recovery); neither imports a mode module."""
    mods = modules()
    for edge, via in (("servicer", "operations"), ("cli", "operations")):
        imports = runtime_imports(mods[f"{PACKAGE}.{edge}"], set(mods))
        assert f"{PACKAGE}.{via}" in imports, (edge, imports)
        assert not {m for m in imports if m.startswith(f"{PACKAGE}.modes")}, (edge, imports)
