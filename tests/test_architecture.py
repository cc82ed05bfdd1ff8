"""The import graph of stamp_core and pipeline follows the data flow (STYLE.md rules 1 and 2).

Every module is parsed with ``ast`` (no imports run) and every import counts, at any nesting level:
inside functions, ``if TYPE_CHECKING`` blocks and ``try`` blocks alike. The checks:

* no import cycle between modules of stamp_core and pipeline;
* stamp_core imports nothing from pipeline, Ray, MLflow, boto3/botocore or webdataset;
* a layer imports only layers below it (:data:`LAYERS`), never a higher one or a sibling of its
  own rank (pipeline.data and pipeline.stack stay apart);
* no module, job or test imports a ``_private`` name or module across a subpackage boundary;
* every import of an internal module names one that exists (a lazy import of a moved module
  fails here, not when its function first runs).

``test_checker_*`` run the same checks on synthetic modules, so a broken checker cannot pass quietly.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stamp_core", "pipeline")
#: Code outside the packages that imports them: checked for private names and missing modules only.
CLIENT_DIRS = ("jobs", "tests")
#: What the algorithm must never import.
CORE_FORBIDDEN = ("pipeline", "ray", "mlflow", "boto3", "botocore", "webdataset")

#: (group, rank): a module may import its own group or a group of lower rank. A group is a module
#: or a package and everything below it; the longest matching group classifies a module.
#: config and plots sit just above settings: every layer above may use typed configs and figures.
#: The package's own __init__ comes last: nothing imports it.
LAYERS: tuple[tuple[str, int], ...] = (
    ("stamp_core", 0),
    ("pipeline.settings", 1),
    ("pipeline.config", 2),
    ("pipeline.plots", 2),
    ("pipeline.data", 3),
    ("pipeline.stack", 3),
    ("pipeline.registry", 4),
    ("pipeline.training", 5),
    ("pipeline.apps", 6),
    ("pipeline", 7),  # pipeline/__init__.py only (a group matches its own name and what is below it)
)


# =============================================================================== the checker


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (``name`` from it, for ``from target import name``) at ``line``."""

    source: str
    target: str
    line: int
    name: str | None = None


@dataclass
class Graph:
    modules: dict[str, str]  #: module name -> file (for messages)
    edges: list[Edge] = field(default_factory=list)  #: imports from known modules, of anything
    clients: list[Edge] = field(default_factory=list)  #: imports made by jobs and tests

    def internal(self, name: str) -> bool:
        """Whether ``name`` is (or would be) a module of one of the parsed packages."""
        return name.split(".")[0] in {m.split(".")[0] for m in self.modules}


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """Dotted name of a source file and whether it is a package ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imports(tree: ast.AST, module: str, is_package: bool, known: Iterable[str]) -> list[Edge]:
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Edge(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from package import module`
                    out.append(Edge(module, sub, node.lineno))
                else:
                    out.append(Edge(module, base, node.lineno, alias.name))
    return out


def build_graph(sources: Mapping[str, tuple[str, bool, str]], client_sources: Mapping[str, str] = {}) -> Graph:
    """Graph of ``{module: (source text, is_package, file)}`` plus client files ``{file: source}``."""
    graph = Graph({name: file for name, (_, _, file) in sources.items()})
    for name, (text, is_package, _) in sources.items():
        graph.edges += _imports(ast.parse(text), name, is_package, sources)
    for file, text in client_sources.items():
        graph.clients += _imports(ast.parse(text), file, False, sources)
    return graph


def load_tree(root: Path = ROOT) -> Graph:
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = module_name(path, root)
            sources[name] = (path.read_text(), is_package, str(path.relative_to(root)))
    clients = {str(p.relative_to(root)): p.read_text()
               for d in CLIENT_DIRS for p in sorted((root / d).rglob("*.py")) if "__pycache__" not in p.parts}
    return build_graph(sources, clients)


def _internal_edges(graph: Graph) -> dict[str, list[Edge]]:
    out: dict[str, list[Edge]] = {m: [] for m in graph.modules}
    for e in graph.edges:
        if e.target in graph.modules and e.target != e.source:
            out[e.source].append(e)
    return out


def find_cycles(graph: Graph) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component of two or more modules."""
    adj = _internal_edges(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in adj[v]:
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
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

    for v in sorted(adj):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first from start back to start, inside the component: the shortest cycle through it.
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        found: list[Edge] | None = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for e in adj[v]:
                    if e.target == start:
                        found = paths[v] + [e]
                        break
                    if e.target in component and e.target not in paths:
                        paths[e.target] = paths[v] + [e]
                        nxt.append(e.target)
                if found:
                    break
            frontier = nxt
        assert found is not None
        cycles.append(found)
    return cycles


def group_of(module: str, layers: Iterable[tuple[str, int]] = LAYERS) -> tuple[str, int] | None:
    best = None
    for group, rank in layers:
        exact_only = group in PACKAGES and any(g.startswith(group + ".") for g, _ in layers)
        if module == group or (not exact_only and module.startswith(group + ".")):
            if best is None or len(group) > len(best[0]):
                best = (group, rank)
    return best


def layer_violations(graph: Graph, layers: Iterable[tuple[str, int]] = LAYERS) -> list[str]:
    layers = tuple(layers)
    problems = [f"{m} ({graph.modules[m]}) is in no layer: add it to LAYERS" for m in sorted(graph.modules)
                if group_of(m, layers) is None]
    for e in graph.edges:
        if e.target not in graph.modules:
            continue
        src, dst = group_of(e.source, layers), group_of(e.target, layers)
        if src is None or dst is None or src[0] == dst[0]:
            continue
        if dst[1] >= src[1]:
            where = "a higher layer" if dst[1] > src[1] else "a sibling of the same layer"
            problems.append(f"{graph.modules[e.source]}:{e.line}: {e.source} ({src[0]}) imports {e.target} "
                            f"({dst[0]}), {where}")
    return problems


def core_violations(graph: Graph) -> list[str]:
    return [f"{graph.modules[e.source]}:{e.line}: {e.source} imports {e.target}" for e in graph.edges
            if e.source.split(".")[0] == "stamp_core" and e.target.split(".")[0] in CORE_FORBIDDEN]


def _private(target: str, name: str | None) -> str | None:
    parts = target.split(".") + ([name] if name else [])
    return next((p for p in parts if p.startswith("_") and not p.startswith("__")), None)


def private_violations(graph: Graph, layers: Iterable[tuple[str, int]] = LAYERS) -> list[str]:
    """``_private`` names or modules imported from outside their own group."""
    layers = tuple(layers)
    problems = []
    for e in graph.edges + graph.clients:
        if not graph.internal(e.target):
            continue
        hidden = _private(e.target, e.name)
        if hidden is None:
            continue
        src, dst = group_of(e.source, layers), group_of(e.target, layers)
        if e in graph.clients or src is None or dst is None or src[0] != dst[0]:
            where = graph.modules.get(e.source, e.source)
            problems.append(f"{where}:{e.line}: imports {hidden} from {e.target}, private to {dst[0] if dst else '?'}")
    return problems


def unresolved_imports(graph: Graph) -> list[str]:
    """Imports of internal modules that do not exist (``from M import name`` checks M only)."""
    return [f"{graph.modules.get(e.source, e.source)}:{e.line}: no module {e.target}"
            for e in graph.edges + graph.clients
            if graph.internal(e.target) and e.target not in graph.modules]


# =============================================================================== the repository


@pytest.fixture(scope="module")
def tree() -> Graph:
    return load_tree()


def test_the_tree_was_read(tree: Graph) -> None:
    assert {"stamp_core", "pipeline.data.episodes", "pipeline.training.meta_train", "pipeline.apps.cli"} <= set(tree.modules)
    assert any(e.source == "pipeline.training.tune" and e.target == "pipeline.registry" for e in tree.edges), \
        "function-level imports must count"


def test_no_import_cycles(tree: Graph) -> None:
    cycles = find_cycles(tree)
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join([c[0].source] + [f"{e.target} ({tree.modules[e.source]}:{e.line})" for e in c]) for c in cycles)


def test_stamp_core_imports_no_infrastructure(tree: Graph) -> None:
    problems = core_violations(tree)
    assert not problems, "stamp_core must stay plain PyTorch:\n" + "\n".join(problems)


def test_layers_only_import_downwards(tree: Graph) -> None:
    problems = layer_violations(tree)
    assert not problems, "imports against the data flow:\n" + "\n".join(problems)


def test_no_private_names_cross_a_subpackage(tree: Graph) -> None:
    problems = private_violations(tree)
    assert not problems, "make these public (and re-export them) or keep them inside:\n" + "\n".join(problems)


def test_every_internal_import_names_an_existing_module(tree: Graph) -> None:
    problems = unresolved_imports(tree)
    assert not problems, "\n".join(problems)


def test_subpackages_declare_what_they_export() -> None:
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        body = ast.parse(init.read_text()).body
        declared = [n for n in body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        assert declared, f"{init.relative_to(ROOT)} has no explicit __all__"
        names = ast.literal_eval(declared[0].value)
        assert names and not any(n.startswith("_") for n in names), init


# =============================================================================== the checker itself


def _synthetic(modules: dict[str, str]) -> Graph:
    return build_graph({name: (text, name in ("pkg", "pkg.low", "pkg.high"), f"{name}.py")
                        for name, text in modules.items()})


SYNTHETIC_LAYERS = (("pkg.low", 0), ("pkg.high", 1), ("pkg", 2))


def test_checker_reports_a_cycle_with_its_path() -> None:
    graph = _synthetic({
        "pkg": "",
        "pkg.low": "",
        "pkg.low.a": "from pkg.low import b\n",
        "pkg.low.b": "import os\n\ndef f():\n    from pkg.low.c import thing\n",  # a function-level import
        "pkg.low.c": "from . import a\n",  # relative
        "pkg.low.d": "from pkg.low import a\n",  # leads into the cycle, is not part of it
    })
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    path = [cycles[0][0].source] + [e.target for e in cycles[0]]
    assert path == ["pkg.low.a", "pkg.low.b", "pkg.low.c", "pkg.low.a"]
    assert cycles[0][1].line == 4


def test_checker_accepts_an_acyclic_graph() -> None:
    graph = _synthetic({"pkg": "", "pkg.low": "", "pkg.low.a": "from pkg.low import b\n", "pkg.low.b": "import json\n"})
    assert find_cycles(graph) == []


def test_checker_reports_upward_private_missing_and_core_imports() -> None:
    graph = _synthetic({
        "pkg": "",
        "pkg.low": "",
        "pkg.high": "",
        "pkg.low.a": "def f():\n    from pkg.high.b import run\n",
        "pkg.high.b": "from pkg.low.a import _helper\nfrom pkg.low import gone\n",
        "stamp_core": "",
        "stamp_core.x": "if False:\n    import mlflow.pyfunc\n",
    })
    assert layer_violations(graph, SYNTHETIC_LAYERS + (("stamp_core", 0),)) == [
        "pkg.low.a.py:2: pkg.low.a (pkg.low) imports pkg.high.b (pkg.high), a higher layer"]
    assert private_violations(graph, SYNTHETIC_LAYERS) == ["pkg.high.b.py:1: imports _helper from pkg.low.a, private to pkg.low"]
    assert core_violations(graph) == ["stamp_core.x.py:2: stamp_core.x imports mlflow.pyfunc"]
    graph.modules["pipeline.x"] = "pipeline/x.py"
    graph.edges.append(Edge("pipeline.x", "pipeline.train", 3, "run_meta_train"))
    assert unresolved_imports(graph) == ["pipeline/x.py:3: no module pipeline.train"]
