"""Reading the project's imports from source (AST) and checking their direction (issue 14).

Every ``import`` / ``from ... import`` counts, lazy ones inside functions included. Modules are named as
they install: ``gblrc/...`` as ``gblrc...``, ``passes/`` as ``gblrc.passes``, ``runtime/`` as ``gblrc.runtime``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SOURCES = {"gblrc": "gblrc", "passes": "gblrc.passes", "runtime": "gblrc.runtime"}

# group -> the groups it may import (besides its own); the pipeline's direction.
ALLOWED = {
    "errors": set(),
    "ir": set(),
    "runtime": set(),
    "passes": {"ir", "runtime", "errors"},
    "nn": {"ir", "errors"},
    "io": {"nn", "ir", "errors"},
    "learn": {"io", "nn", "ir", "errors"},
    "export": {"passes", "runtime", "io", "nn", "ir", "errors"},
    "cli": {"root", "learn", "export", "io", "nn", "ir", "passes", "runtime", "errors"},
    "root": {"learn", "export", "io", "nn", "ir", "passes", "runtime", "errors"},
}
# third-party packages a group may not import at all (besides what it may import by ALLOWED)
FORBIDDEN_THIRD_PARTY = {
    "ir": {"torch", "onnx", "onnxruntime", "onnx_graphsurgeon", "transformers"},
    "passes": {"torch", "transformers"},
}
ONLY_THIRD_PARTY = {"runtime": {"onnxruntime", "numpy"}}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the source folders of ``root``."""
    out = {}
    for folder, pkg in SOURCES.items():
        for p in sorted((root / folder).rglob("*.py")):
            parts = list(p.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


def group(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1]


def _imported(tree: ast.AST, mod: str, is_pkg: bool, known: dict) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level names) that ``mod``'s source imports."""
    project, third = set(), set()

    def add(name: str):
        while name and name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known:
            if name != mod:
                project.add(name)
        else:
            third.add(name.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                b = ".".join(base + ([node.module] if node.module else []))
            else:
                b = node.module
            for a in node.names:
                full = f"{b}.{a.name}"
                add(full if full in known else b)
    return project, third


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> third-party packages it imports)."""
    known = modules(root)
    edges, third = {}, {}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[mod], third[mod] = _imported(tree, mod, path.name == "__init__.py", known)
    return edges, third


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(root: Path) -> list[str]:
    """One line per problem: wrong-way imports, forbidden third-party imports and import cycles."""
    edges, third = import_graph(root)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    out = []
    for mod in sorted(edges):
        g = group(mod)
        for dep in sorted(edges[mod]):
            h = group(dep)
            if h != g and h not in ALLOWED[g]:
                out.append(f"wrong-way import: {mod} ({g}) imports {dep} ({h}); {g} may import {sorted(ALLOWED[g])}")
        for t in sorted(third[mod] & FORBIDDEN_THIRD_PARTY.get(g, set())):
            out.append(f"forbidden import: {mod} ({g}) imports {t}")
        if g in ONLY_THIRD_PARTY:
            for t in sorted(third[mod] - stdlib - ONLY_THIRD_PARTY[g]):
                out.append(f"forbidden import: {mod} ({g}) imports {t}; {g} may use only {sorted(ONLY_THIRD_PARTY[g])}")
    for comp in cycles(edges):
        out.append("import cycle between " + ", ".join(comp))
    return out
