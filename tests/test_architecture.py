"""The layout's rules, checked: no import circle between the packages' modules, and no
module over ~600 lines without a reason stated in its docstring (README "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "policies", "pricing")
LONG = 650  # "~600"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts).removesuffix(".__init__")] = path
    return out


def imports_at_load(path: Path, known: dict[str, Path]) -> set[str]:
    """What importing the module imports of ours (not under TYPE_CHECKING, not in functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if not isinstance(node, ast.Import | ast.ImportFrom | ast.If | ast.Try):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                found.add(n.module)
                found.update(f"{n.module}.{a.name}" for a in n.names)
    return {name for name in found if name in known}


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: imports_at_load(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 60  # the walk saw the packages


def test_a_long_module_says_why() -> None:
    long = {
        name: path for name, path in modules().items() if len(path.read_text().splitlines()) > LONG
    }
    unexplained = [
        name
        for name, path in long.items()
        if "on purpose" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert unexplained == []
