"""Find import cycles among the modules of a package (default: service/), TYPE_CHECKING imports included.

Usage: python scripts/import_cycles.py [PACKAGE_DIR] [--runtime]

Builds the graph of every ``import x`` and ``from x import y`` (at any depth
of a module: inside functions and ``if TYPE_CHECKING:`` too) between the
package's modules with ``ast``, prints each cycle (strongly connected
component), and exits 1 if there is one. ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg``. A package's
``__init__`` is not counted as imported by its submodules (Python runs it
first, but that is not a dependency of theirs).

With ``--runtime`` it also checks that the modules the workers, beat and the
client load (RUNTIME) reach none of the operator-only packages (OPERATOR_ONLY).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: What the workers, beat and the web app import.
RUNTIME = ("service.app", "service.client", "service.publishing", "service.worker")
#: What only operators' commands use: never reached from RUNTIME.
OPERATOR_ONLY = ("service.broker", "service.cli", "service.stack", "service.deadletters", "service.console",
                 "service.relay")


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under package directory ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    known = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".rstrip(".") if base else package
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def reachable(edges: dict[str, set[str]], starts: tuple[str, ...]) -> set[str]:
    """Every module reachable from the modules named (or under) ``starts``."""
    todo = [m for m in edges if any(m == s or m.startswith(s + ".") for s in starts)]
    seen = set(todo)
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def main(argv: list[str]) -> int:
    """Print the cycles (and with --runtime the forbidden reaches); 1 if there are any."""
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1] / "service")
    edges = graph(root)
    found = cycles(edges)
    for component in found:
        print("cycle: " + " <-> ".join(component))
    status = 1 if found else 0
    imports = sum(len(v) for v in edges.values())
    print(f"{len(edges)} modules, {imports} imports between them, {len(found)} cycle(s)")
    if "--runtime" in argv:
        bad = sorted(m for m in reachable(edges, RUNTIME)
                     if any(m == o or m.startswith(o + ".") for o in OPERATOR_ONLY))
        for module in bad:
            print(f"runtime reaches {module}")
        print(f"runtime ({', '.join(RUNTIME)}) reaches {len(bad)} operator-only module(s)")
        status = status or (1 if bad else 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
