"""The package shows its layers: every module of rba_core and pages belongs to one layer, imports (at any
depth of the file, ``TYPE_CHECKING`` blocks too) point only to its own layer or lower ones, and no group of
modules imports itself round. Read with ``ast``: nothing is imported."""

import ast
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Lowest first; README's architecture section draws the same.
LAYERS = {
    "foundations": ["rba_core.errors", "rba_core.quiet", "rba_core.progress", "rba_core.threads", "rba_core.latency",
                    "rba_core.projection", "rba_core.ranking", "rba_core.registry", "rba_core.distributed",
                    "rba_core.cache"],
    "hub": ["rba_core.hub"],
    "models": ["rba_core.models", "rba_core.models.*"],
    "data": ["rba_core.data", "rba_core.data.*", "rba_core.demo", "rba_core.demo.*", "rba_core.tasks",
             "rba_core.tasks.*"],
    "statistics and maps": ["rba_core.measures", "rba_core.measures.*", "rba_core.maps", "rba_core.maps.*"],
    "passes": ["rba_core.passes", "rba_core.passes.*"],
    "the run": ["rba_core.ops.run"],
    "results and exports": ["rba_core.store", "rba_core.store.*"],
    "operations": ["rba_core.ops", "rba_core.ops.*"],
    "interfaces": ["rba_core", "rba_core.__main__", "rba_core.cli", "rba_core.cli_eval", "pages", "pages.*", "app"],
}


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (wherever the import is written)."""
    files = {}
    for path in [*ROOT.joinpath("rba_core").rglob("*.py"), *ROOT.joinpath("pages").rglob("*.py"), ROOT / "app.py"]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else resolve(node.module)
                          for a in node.names}
        graph[module] = {m for m in found if m and m != module}
    return graph


def layer_of(module: str) -> int | None:
    return next((n for n, patterns in enumerate(LAYERS.values()) if any(fnmatch(module, p) for p in patterns)), None)


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = module_graph()
    assert [m for m in graph if layer_of(m) is None] == []
    names = list(LAYERS)
    upward = [f"{m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})"
              for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_cycle():
    graph = module_graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
