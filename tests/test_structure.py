"""The shape of the code (issues 20 and 32): compose/ imports neither pipelines nor diffusers nor transformers, at
any level, its modules import one another in one order without a cycle (function-level imports included), every
section of docs/MATH.md the code cites exists, and no function of compose/ or pipelines/ grows past 100 lines of
body."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"


def compose_imports() -> dict[str, set[str]]:
    """module -> the compose modules it imports (anywhere in the file, relative or absolute)."""
    names = {p.stem for p in COMPOSE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in COMPOSE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.module and node.module.startswith("compose"):
                    parts = node.module.split(".")
                    targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                else:
                    continue
                deps.update(t.split(".")[0] for t in targets if t and t.split(".")[0] in names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "compose" and len(parts) > 1 and parts[1] in names:
                        deps.add(parts[1])
        deps.discard(path.stem)
        graph[path.stem] = deps
    return graph


def test_compose_modules_import_one_another_without_a_cycle():
    graph = compose_imports()
    graph.pop("__init__")  # the package re-exports; nothing imports it back
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import cycle: {' -> '.join([*stack, m])}"
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*stack, m])
        state[m] = 2
        order.append(m)

    for m in sorted(graph):
        visit(m, [])
    # the documented order (compose/__init__.py): every module imports only modules before it
    documented = ["options", "schedule", "predictions", "models", "operators", "solvers", "composer", "schedule_files",
                  "grids", "loop", "smc", "verify", "sampling", "ld3", "toy", "learn_schedule", "thermo"]  # fmt: skip
    assert sorted(documented) == sorted(graph), sorted(set(graph) ^ set(documented))
    pos = {m: i for i, m in enumerate(documented)}
    late = [(m, d) for m in graph for d in graph[m] if pos[d] >= pos[m]]
    assert not late, late
    # one loop: every sampler goes through compose.loop
    assert "loop" in graph["ld3"] and "loop" in graph["smc"] and "loop" in graph["sampling"]


def test_import_compose_imports_neither_diffusers_nor_transformers():
    code = (
        "import sys, compose, compose.ld3, compose.thermo, compose.learn_schedule; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_compose_imports_no_pipelines_diffusers_or_transformers_at_any_level():
    """compose/ is the maths: no import of pipelines, diffusers or transformers anywhere in its files, inside
    functions included (a function-level import runs the day the function is called)."""
    bad = []
    for path in COMPOSE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("pipelines", "diffusers", "transformers"):
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert not bad, bad


def test_option_names_load_without_torch():
    """The names of every choice (solvers, operators, divergences, LoRA modes) and their checks live in
    compose.options, which `pipelines.jobs` reads to check a job file: importing it loads no torch."""
    code = (
        "import sys, compose.options as O; "
        "assert O.SOLVERS and O.OPERATORS and O.DIVERGENCES and O.LORA_MODES; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_cited_section_of_the_maths_document_exists():
    headings = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "MATH.md").read_text(), flags=re.M))
    cited: set[str] = set()
    for folder in ("compose", "pipelines", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"MATH\.md,? sections? (\d+)(?:\s*-\s*(\d+))?", path.read_text()):
                lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
                cited.update(str(k) for k in range(lo, hi + 1))
    assert cited and cited <= headings, sorted(cited - headings)


def test_no_function_of_the_library_grows_past_100_lines():
    long = []
    for path in [*COMPOSE.glob("*.py"), *(ROOT / "pipelines").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                start = first.end_lineno + 1 if doc else first.lineno
                if node.end_lineno - start + 1 > 100:
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, long
