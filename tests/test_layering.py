"""lmforge's modules import one way: no circles, and no import running back up the layering.

Every module under lmforge/ is parsed (imports inside functions count too: they still tie the two modules
together; only `if TYPE_CHECKING:` blocks, which never run, are skipped); the graph is built over lmforge's
own modules. The layering, lowest first:

    constants, files, lazy, textio, utils  <-  nn  <-  hub (formats)  <-  config, models
        <-  generation, tokenizer, data  <-  training, pipelines, interpret  <-  cli, serving

(`nn` may use the hub's file readers, so the hub must stay below `nn`'s users and import no model.)
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

import lmforge

ROOT = Path(lmforge.__file__).parent

# importer -> the only lmforge modules it may import (the bottom layers)
MAY_ONLY_IMPORT = {
    "lmforge.constants": ("lmforge.constants",),
    "lmforge.lazy": ("lmforge.lazy",),
    "lmforge.textio": ("lmforge.textio", "lmforge.constants"),
    "lmforge.files": ("lmforge.files",),
    "lmforge.utils": ("lmforge.utils", "lmforge.constants"),
    "lmforge.nn": ("lmforge.nn", "lmforge.constants", "lmforge.files", "lmforge.utils", "lmforge.hub"),
}

# importer -> lmforge modules it must never import (everything above it)
ABOVE_MODELS = (
    "lmforge.training",
    "lmforge.pipelines",
    "lmforge.cli",
    "lmforge.serving",
    "lmforge.interpret",
    "lmforge.auto",
)
MUST_NOT_IMPORT = {
    "lmforge.hub": (
        "lmforge.models",
        "lmforge.config",
        "lmforge.generation",
        "lmforge.tokenizer",
        "lmforge.data",
        *ABOVE_MODELS,
    ),
    "lmforge.models": ("lmforge.data", *ABOVE_MODELS),
    "lmforge.config": ("lmforge.models", "lmforge.data", *ABOVE_MODELS),
    "lmforge.generation": ("lmforge.models", "lmforge.data", *ABOVE_MODELS),
    "lmforge.tokenizer": ("lmforge.models", "lmforge.generation", *ABOVE_MODELS),
    "lmforge.data": ("lmforge.training", "lmforge.pipelines", "lmforge.cli", "lmforge.serving"),
    "lmforge.training": ("lmforge.cli", "lmforge.serving"),
    "lmforge.pipelines": ("lmforge.cli", "lmforge.serving"),
    "lmforge.interpret": ("lmforge.cli", "lmforge.serving"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _target(name: str) -> str | None:
    """The lmforge module that `name` ("lmforge.models.gpt.GPTConfig", "lmforge.hub") refers to: the
    longest prefix of it that is a module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` (annotation-only imports)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported lmforge module, line) for every import statement in `module`, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name inside `base`
        else:
            continue
        for name in names:
            target = _target(name)
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycle_through(start: str, members: set[str]) -> list[str]:
    """A shortest import path start -> ... -> start inside `members` (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt, _ in GRAPH[node]:
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError("not a cycle")


def strongly_connected() -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module: each holds a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return components


def _line(importer: str, imported: str) -> int:
    return min(line for target, line in GRAPH[importer] if target == imported)


def test_the_walker_sees_lmforge_imports() -> None:
    assert ("lmforge.hub", _line("lmforge.models.base", "lmforge.hub")) in GRAPH["lmforge.models.base"]
    assert {"lmforge.hub.checkpoint", "lmforge.models.gpt", "lmforge.nn.lora"} <= set(MODULES)


def test_no_import_circles() -> None:
    circles = []
    for component in strongly_connected():
        cycle = _cycle_through(min(component), component)
        steps = "".join(f"{a} -[line {_line(a, b)}]-> " for a, b in zip(cycle, cycle[1:])) + cycle[-1]
        circles.append(f"{steps}   [all modules in this knot: {sorted(component)}]")
    assert not circles, "import circles:\n  " + "\n  ".join(circles)


@pytest.mark.parametrize("importer", sorted(MAY_ONLY_IMPORT))
def test_bottom_layers_import_nothing_above_them(importer: str) -> None:
    allowed = MAY_ONLY_IMPORT[importer]
    bad = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
        for m in MODULES
        if _within(m, importer)
        for target, line in GRAPH[m]
        if not any(_within(target, a) for a in allowed)
    ]
    assert not bad, f"{importer} may only import {allowed}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("importer", sorted(MUST_NOT_IMPORT))
def test_no_import_runs_back_up_the_layering(importer: str) -> None:
    forbidden = MUST_NOT_IMPORT[importer]
    bad = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
        for m in MODULES
        if _within(m, importer)
        for target, line in GRAPH[m]
        if any(_within(target, f) for f in forbidden)
    ]
    assert not bad, f"{importer} must not import {forbidden}:\n  " + "\n  ".join(bad)
