"""The import graph of swiglu_hf, read from the source with `ast`: no cycle anywhere (tools included),
and the library never imports the tools.

Every import counts, at module level or inside a function: relative (`from ..memory import x`,
`from . import data`, which names the submodule `data`, not its package) and absolute
(`import swiglu_hf.x`, `from swiglu_hf.x import y`). A module's own package is not an edge: Python
runs a package's __init__ before its submodules, so the edges that matter are the ones written down.
`swiglu_hf.patches` lives in patches/ (pyproject's package-dir) and is read from there.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"swiglu_hf": ROOT / "swiglu_hf", "swiglu_hf.patches": ROOT / "patches"}
TOOLS, CLI = "swiglu_hf.tools", "swiglu_hf.cli"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package roots."""
    found = {}
    for prefix, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The swiglu_hf modules `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            # `from m import x`: the submodule m.x when there is one, else m itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import swiglu_hf.a.b` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or a knot of them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert len(graph) > 60 and "swiglu_hf.patches.split" in graph
    finetune = "swiglu_hf.tools.finetune"
    assert f"{finetune}.data" in graph[f"{finetune}.run"]  # `from . import data`: the submodule
    assert f"{finetune}.run" in graph[finetune]  # `from .run import ...` inside _main
    assert "swiglu_hf.peak" in graph[f"{finetune}.memory"]  # `from ...peak import ...`
    assert "swiglu_hf.loading" in graph[f"{finetune}.model"]  # `from swiglu_hf.loading import ...` in a function
    assert "swiglu_hf" in graph[f"{finetune}.model"]  # `from swiglu_hf import apply_swiglu_patch`: the package


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_core_never_imports_the_tools():
    """The library (everything but swiglu_hf/tools/ and the CLI over it) imports no tools module, so
    `import swiglu_hf` and verify load models without them."""
    graph = import_graph()
    offenders = [f"{name} -> {dep}" for name, deps in sorted(graph.items())
                 if not (name == CLI or name == TOOLS or name.startswith(TOOLS + "."))
                 for dep in sorted(deps) if dep == TOOLS or dep.startswith(TOOLS + ".")]
    assert not offenders, offenders
