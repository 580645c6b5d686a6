"""The house: enrich's modules import each other without a circle, and at module level.

Read from the code itself with `ast` (nothing is imported), so a cycle hidden behind an import
inside a function is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "enrich"
# Imported inside functions on purpose: heavy and optional, loaded only when used.
LAZY_ALLOWED = {"ray", "enrich.emulator", "enrich.__init__"}
# The CLI's one deferred import: the pipeline (polars, pyarrow, httpx: about a second) loads only for a
# command with work to do, so `--help` and the re-run of a finished job (settled.py) start fast.
LAZY_BOUNDARY = {("cli.py", "enrich.commands"), ("launch.py", "enrich.cli")}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported enrich module, imported inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module(path)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this package
                    pkg = me.split(".")[: -child.level] if path.name != "__init__.py" else me.split(".")
                    base = ".".join([*pkg, base] if base else pkg)
                found.append((base, inner))
                for a in child.names:  # `from enrich import failpoints` imports a module
                    found.append((f"{base}.{a.name}", inner))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py") if "emulator" not in p.relative_to(ROOT).parts]
    modules = {_module(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        targets = {name for name, _ in _imports(p) if name in modules and name != "enrich"}
        graph[_module(p)] = targets - {_module(p)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    """No circle among enrich's modules (the emulator beside it excluded), imports in functions included."""
    graph = _graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The finder itself sees a circle when there is one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if "emulator" not in p.parts), ids=str)
def test_imports_at_module_level(path: Path) -> None:
    """enrich modules are imported at module level; only heavy optional engines load lazily."""
    lazy = [
        name
        for name, nested in _imports(path)
        if nested
        and (name == "enrich" or name.startswith("enrich."))
        and not any(name == a or name.startswith(a + ".") for a in LAZY_ALLOWED)
        and (path.name, name) not in LAZY_BOUNDARY
    ]
    if path.name == "__init__.py" and path.parent == ROOT:
        lazy = []  # the package's lazy re-exports keep `import enrich` light, deliberately
    assert not lazy, f"{path.name} imports inside functions: {lazy}"


def test_the_readme_names_tests_that_exist() -> None:
    """Every `test_x.py::test_name` the README's Guarantees cite is a test in tests/ (so the claim stays checked)."""
    import re

    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(?:(test_\w+\.py)(?:::(test_\w+))?|::(test_\w+))`", readme)
    assert len(cited) > 20
    last_file = None
    for file, name, bare in cited:
        last_file = file or last_file
        name = name or bare
        assert last_file is not None
        source = (ROOT.parent / "tests" / last_file).read_text(encoding="utf-8")
        if name:
            assert re.search(rf"^def {name}\(", source, flags=re.M), f"README cites {last_file}::{name}"
