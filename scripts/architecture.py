"""Architecture figures of the package: import cycles, uses of ``Any``, module sizes, private reach-ins.

Every import counts, including those inside functions (they still tie the modules together). Run it to print
the figures; ``tests/test_architecture.py`` fails on any cycle or private reach-in it finds.

    python scripts/architecture.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` inside the package at ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> dict[str, set[str]]:
    """Intra-package imports of each module, resolved to modules (``from pkg import sub`` → ``pkg.sub``)."""
    mods = modules(root)
    pkg = root.name
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                if name.split(".")[0] != pkg:
                    continue
                while name and name not in mods:  # an attribute of a module: the module
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def any_uses(root: Path) -> int:
    """Occurrences of the name ``Any`` in the package's code (imports included, comments and strings not)."""
    n = 0
    for path in modules(root).values():
        toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        n += sum(1 for t in toks if t.type == tokenize.NAME and t.string == "Any")
    return n


def private_reach_ins(root: Path) -> list[str]:
    """``module._name`` used outside its module: imported by name or read as an attribute of a module
    alias."""
    mods = modules(root)
    found = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif base in mods and a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{mod} imports {base}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def report(root: Path) -> dict[str, object]:
    """The figures, as a dict."""
    mods = modules(root)
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    largest = max(sizes, key=lambda m: sizes[m])
    return {
        "modules": len(mods),
        "lines": sum(sizes.values()),
        "any": any_uses(root),
        "cycles": cycles(imports(root)),
        "largest": f"{largest} ({sizes[largest]} lines)",
        "private_reach_ins": private_reach_ins(root),
    }


if __name__ == "__main__":
    pkg = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "geo_dino")
    for key, value in report(pkg).items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")
