"""The package's shape in numbers, from its source alone (issue 16 measures the redesign with them).

    python tools/arch_metrics.py            # a table
    python tools/arch_metrics.py --json     # the same as JSON

- the longest functions and modules (lines, docstrings included);
- import cycles between the package's modules, counting imports inside functions too (a lazy import hides a
  cycle from Python, not from a reader);
- which modules import `deepspeed` itself, which import a concrete backend (backends/single.py,
  backends/deepspeed/) from outside backends/, and which import the backends package at all;
- upward imports: a module importing one of a higher layer (LAYERS: foundation < config < data < backends and
  model < training < command line).
Modules are read with `ast`; nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mellama_train"
ROOT = "mellama_train"
CONCRETE_BACKENDS = (
    f"{ROOT}.backends.single",
    f"{ROOT}.backends.deepspeed",
    f"{ROOT}.engine",
    f"{ROOT}.single_device",
)
LAYERS = [
    # foundation: imports nothing above it
    {
        "exit_codes",
        "schedule",
        "integrity",
        "leftovers",
        "watchdog",
        "preemption",
        "metrics",
        "data.reasons",
        "sample_data",
    },
    {"config", "ds_config"},  # the recipe and its resolution
    {"data"},  # every data.* module
    {"backends", "engine", "single_device", "model", "plan", "loss", "guard"},
    set(),  # the training side: every module not named (the default)
    {"cli", "status", "report", "__main__"},  # the command line
]
TRAINING = 4


def layer_of(name: str) -> int:
    """The layer of module `name` (LAYERS); a package's submodules share its layer unless named themselves."""
    rel = name.removeprefix(f"{ROOT}.")
    for candidate in (rel, rel.split(".")[0]):
        for i, names in enumerate(LAYERS):
            if candidate in names:
                return i
    return TRAINING


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(tree: ast.AST, name: str) -> set[str]:
    """Modules of the package, and third-party roots, that a module imports anywhere in its body."""
    found = set()
    package = name.rsplit(".", 1)[0] if not name.endswith("__init__") else name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def measure() -> dict:
    modules: dict[str, ast.Module] = {}
    lines: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or "sample_data" in path.parts and path.name != "__init__.py":
            continue
        name = module_name(path)
        text = path.read_text(encoding="utf-8")
        modules[name], lines[name] = ast.parse(text), len(text.splitlines())
    functions = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    graph = {
        name: sorted({m for m in imports_of(tree, name) if m in modules and m != name})
        for name, tree in modules.items()
    }
    deepspeed = sorted(
        n for n, t in modules.items() if any(m.split(".")[0] == "deepspeed" for m in imports_of(t, n))
    )
    outside = {n: deps for n, deps in graph.items() if not n.startswith(f"{ROOT}.backends")}
    concrete = sorted(n for n, deps in outside.items() if any(d.startswith(CONCRETE_BACKENDS) for d in deps))
    backends = sorted(
        n
        for n, deps in outside.items()
        if any(d.startswith((f"{ROOT}.backends", *CONCRETE_BACKENDS)) for d in deps)
    )
    upward = sorted(
        f"{n} -> {d}" for n, deps in graph.items() for d in deps if layer_of(d) > layer_of(n) and d != ROOT
    )
    return {
        "longest_functions": [{"lines": n, "function": f} for n, f in sorted(functions, reverse=True)[:5]],
        "longest_modules": [
            {"lines": n, "module": m} for m, n in sorted(lines.items(), key=lambda x: -x[1])[:5]
        ],
        "import_cycles": cycles(graph),
        "import_deepspeed": deepspeed,
        "import_concrete_backend": concrete,
        "import_backends": backends,
        "upward_imports": upward,
        "modules": len(modules),
    }


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    figures = measure()
    if p.parse_args().json:
        print(json.dumps(figures, indent=2))
        return
    print(f"modules: {figures['modules']}")
    for row in figures["longest_functions"]:
        print(f"function {row['lines']:>5} lines  {row['function']}")
    for row in figures["longest_modules"]:
        print(f"module   {row['lines']:>5} lines  {row['module']}")
    for cycle in figures["import_cycles"]:
        print(f"cycle    {' <-> '.join(cycle)}")
    print(f"import deepspeed: {', '.join(figures['import_deepspeed'])}")
    print(f"import a concrete backend ({len(figures['import_concrete_backend'])}):", end=" ")
    print(", ".join(figures["import_concrete_backend"]))
    print(f"import backends/ at all: {len(figures['import_backends'])}")
    print(f"upward imports ({len(figures['upward_imports'])}):")
    for edge in figures["upward_imports"]:
        print(f"    {edge}")


if __name__ == "__main__":
    sys.exit(main())
