"""The layout keeps its rules: no import cycles, runtime apart from the tools, short modules, bench apart from tests."""

from __future__ import annotations

import ast
import runpy

from tests.helpers import REPO

CYCLES = runpy.run_path(str(REPO / "scripts" / "import_cycles.py"))
#: A module longer than this says why in its docstring ("Why this module is over 400 lines").
MAX_LINES = 410


def test_service_has_no_import_cycles_and_the_runtime_reaches_no_tool():
    edges = CYCLES["graph"](REPO / "service")
    assert CYCLES["cycles"](edges) == []
    runtime = CYCLES["reachable"](edges, CYCLES["RUNTIME"])
    tools = CYCLES["OPERATOR_ONLY"]
    assert [m for m in runtime if any(m == t or m.startswith(t + ".") for t in tools)] == []


def test_long_modules_say_why():
    long = []
    for path in sorted((REPO / "service").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "Why this module is over 400 lines" not in (ast.get_docstring(
                ast.parse(text)) or ""):
            long.append(str(path.relative_to(REPO)))
    assert long == []


def test_bench_and_harness_import_nothing_of_tests():
    for folder in ("bench", "harness"):
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not [n for n in names if n == "tests" or n.startswith("tests.")], path
