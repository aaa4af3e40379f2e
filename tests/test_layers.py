"""The package layout is the architecture: imports point down the layers and never form a cycle.

Walks every `import` / `from ... import` in `jaxlora/` with `ast` (including imports inside
functions: a lazy import is still a dependency) and checks, module by module:
- no cycle in the module import graph (a package's `__init__` counts as the package);
- no module imports a module of a higher layer (same layer is fine, e.g. `io` -> `peft`);
- no file over 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxlora"

# Lowest first. A module may import modules of its own layer or any layer below.
LAYERS: list[set[str]] = [
    {"errors", "config"},
    {"models"},
    {"data", "parallel", "losses", "peft"},
    {"io"},
    {"evaluate"},
    {"train"},
    {"bench"},
    {"cli", "__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """jaxlora modules imported by `path` (`from jaxlora.x import y` counts `jaxlora.x.y` when
    that is a module, else `jaxlora.x`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jaxlora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("jaxlora"):
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return {m for m in out if m in known} | {m for m in out if m not in known and m}


def layer_of(mod: str) -> int:
    parts = mod.split(".")
    if mod == "jaxlora":
        return RANK["__init__"]
    return RANK[parts[1]]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_every_subpackage_has_a_layer() -> None:
    top = {module_name(p).split(".")[1] for p in PKG.rglob("*.py") if p.parent != PKG}
    top |= {p.stem for p in PKG.glob("*.py")}
    assert top <= set(RANK), f"add to LAYERS: {sorted(top - set(RANK))}"


def test_imports_resolve_to_modules() -> None:
    mods = modules()
    for m, deps in graph().items():
        unknown = {d for d in deps if d not in mods}
        assert not unknown, f"{m} imports {sorted(unknown)}, which are not jaxlora modules"


def test_no_import_cycle() -> None:
    # The package facades (`jaxlora`, `jaxlora.config`, ...) re-export their submodules; a cycle
    # through a facade is still a cycle, so they stay in the graph.
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down() -> None:
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in graph().items()
        for d in deps
        if d != "jaxlora" and layer_of(d) > layer_of(m)
    ]
    assert upward == []


def test_checker_catches_cycles_and_upward_imports() -> None:
    # The checks above must be able to fail: a synthetic cycle and an upward edge.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("jaxlora.models.llama") < layer_of("jaxlora.train.loop")


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_size(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 450, f"{path.relative_to(PKG.parent)} has {n} lines (> 450): split it"
