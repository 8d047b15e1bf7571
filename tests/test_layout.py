"""The layout holds: every import inside exporter/ (function-level ones included) goes down the stages of the
data flow, never up, and no two modules import each other, directly or round a circle (docs/architecture.md).
graph_rewrite/ is a library: it never imports the exporter."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stage may import the stages with a lower rank (and itself). config and recipe are the foundation.
RANK = {"config": 0, "recipe": 0, "dist": 0, "model": 1, "load": 2, "data": 3, "factorize": 4, "plan": 5, "quantize": 5, "refine": 6,
        "output": 7, "loop": 8, "validate": 9, "onnx": 10, "report": 11, "preflight": 12, "run": 13, "bench": 13,
        "cli": 14, "__init__": 15}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function-level imports included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("exporter", "graph_rewrite")}


def graph() -> dict[str, set[str]]:
    files = [*ROOT.joinpath("exporter").rglob("*.py"), *ROOT.joinpath("graph_rewrite").rglob("*.py")]
    return {module_name(p): imported_modules(p) for p in files}


def stage(module: str) -> str:
    parts = module.split(".")
    return "graph_rewrite" if parts[0] == "graph_rewrite" else (parts[1] if len(parts) > 1 else "__init__")


def test_every_stage_has_a_rank():
    stages = {stage(m) for m in graph() if m.startswith("exporter")}
    assert stages <= set(RANK), f"a new top-level part of exporter/ needs its place in RANK: {stages - set(RANK)}"


def test_imports_go_down_the_stages():
    # `exporter` itself only names the version and the lazy public API
    upward = [f"{m} imports {d}" for m, deps in graph().items() for d in deps if d != "exporter"
              and stage(m) != "graph_rewrite" and stage(d) != "graph_rewrite" and RANK[stage(d)] > RANK[stage(m)]]
    assert upward == []


def test_graph_rewrite_never_imports_the_exporter():
    assert [f"{m} imports {d}" for m, deps in graph().items() if stage(m) == "graph_rewrite"
            for d in deps if d.startswith("exporter")] == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    # A package importing its own submodules (its __init__ re-exporting them) is not a circle of concepts.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph().items()}
    assert cycles(edges) == []


def test_no_function_over_the_length_limit():
    files = [*ROOT.joinpath("exporter").rglob("*.py"), *ROOT.joinpath("graph_rewrite").rglob("*.py"),
             *ROOT.joinpath("benchmarks").rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in files for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
