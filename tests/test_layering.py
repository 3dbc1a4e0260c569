"""The package's layering (SPEC §4, issue 17): imports go one way, from the model to the picture.

Three checks: ``import fxdepass`` loads nothing heavy (Note [Lazy public names] in fxdepass/__init__.py), the
import graph of fxdepass/ and rules/ read from the source has no cycle and keeps each layer below the ones that
build on it, and every public name still resolves, lazily.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: what `import fxdepass` must not load: the optional and inspection libraries, the inspection modules, and
#: torch itself (so that `import fxdepass.errors`, or reading `fxdepass.__version__`, takes milliseconds)
HEAVY = ("networkx", "pydot", "matplotlib", "pandas", "captum", "torch", "transformers",
         "fxdepass.api", "fxdepass.graph", "fxdepass.report", "fxdepass.export", "fxdepass.evaluate", "fxdepass.cli")
#: what the compiler and its results (`import fxdepass.api`) must not load.  Not pydot: torch.export loads it
#: itself when it is installed (torch.fx.passes.graph_drawer).
INSPECTION_LIBRARIES = ("networkx", "matplotlib", "pandas", "captum")
#: the inspection layer: built on the compiler's results, never imported by the compiler or anything below it
INSPECTION = {"fxdepass.graph", "fxdepass.export", "fxdepass.report", "fxdepass.drawing", "fxdepass.evaluate",
              "fxdepass.cli"}
#: the runner and the user API: rules/ must not import them (a rule is a fact about an op, not about a run)
RUNNER = {"fxdepass.api", "fxdepass.planning", "fxdepass.blocked", "fxdepass.routed", "fxdepass.diagnose", "fxdepass.rewrite"}


def _loaded_after(code: str) -> list[str]:
    """The modules of :data:`HEAVY` and :data:`INSPECTION_LIBRARIES` loaded after running ``code`` in a fresh process."""
    watched = sorted(set(HEAVY) | set(INSPECTION_LIBRARIES))
    script = f"import sys\n{code}\nimport json\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_fxdepass_loads_nothing_heavy() -> None:
    assert _loaded_after("import fxdepass") == []
    assert _loaded_after("import fxdepass.errors; fxdepass.__version__") == []


def test_the_compiler_does_not_load_the_inspection_layer() -> None:
    loaded = _loaded_after("import fxdepass.api, fxdepass.results, fxdepass.dataset")
    assert not set(loaded) & (set(INSPECTION_LIBRARIES) | INSPECTION), loaded


def test_public_names_resolve_lazily() -> None:
    """Each public name resolves, to the object its owning module defines, and only then loads that module."""
    script = """
import importlib, sys
import fxdepass
owners = {"build_graph": "fxdepass.graph", "report": "fxdepass.report", "export": "fxdepass.export",
          "compile": "fxdepass.api", "plot_layers": "fxdepass.lens"}
before = {name: module in sys.modules for name, module in owners.items()}
resolved = {name: getattr(fxdepass, name) for name in fxdepass.__all__}
checks = {
    "loaded_early": [name for name, loaded in before.items() if loaded],
    "callable": all(callable(resolved[n]) for n in ("compile", "build_graph", "plot_layers", "load_attribution",
                                                        "layer_lens", "tokens", "diff", "load", "ablate")),
    "same_objects": [fxdepass.build_graph is importlib.import_module("fxdepass.graph").build_graph,
                     fxdepass.Target is importlib.import_module("fxdepass.graph").Target,
                     fxdepass.LogitTarget is importlib.import_module("fxdepass.targets").Target,
                     fxdepass.Attribution is importlib.import_module("fxdepass.api").Attribution,
                     fxdepass.report.write_report is importlib.import_module("fxdepass.report").write_report,
                     callable(fxdepass.export.write_graphml), callable(fxdepass.results.load_attribution)],
    "listed": sorted(set(fxdepass.__all__) - set(dir(fxdepass))),
    "submodule": fxdepass.graph is sys.modules["fxdepass.graph"],
}
try:
    fxdepass.no_such_name
except AttributeError:
    checks["unknown_raises"] = True
import json
print(json.dumps(checks))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    assert checks == {"loaded_early": [], "callable": True, "same_objects": [True] * 7, "listed": [],
                      "submodule": True, "unknown_raises": True}


# -- the import graph, from the source --------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function, except under ``if TYPE_CHECKING:``
    (annotations only: never run)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path, rules: Path) -> dict[str, set[str]]:
    """Each module of ``package`` (named ``fxdepass``) and of ``rules`` (``fxdepass.rules``) → the modules of
    either it imports.  ``from . import x`` names the submodule ``x`` where there is one, else the package."""
    files = {("fxdepass" if p.stem == "__init__" else f"fxdepass.{p.stem}"): p for p in package.glob("*.py")}
    files |= {("fxdepass.rules" if p.stem == "__init__" else f"fxdepass.rules.{p.stem}"): p for p in rules.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        home = name if path.stem == "__init__" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                parts = home.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT / "fxdepass", ROOT / "rules")


def test_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checks below can fail: a function-level import closing a cycle is found, a TYPE_CHECKING one is not."""
    package, rules = tmp_path / "fxdepass", tmp_path / "rules"
    package.mkdir()
    rules.mkdir()
    (package / "__init__.py").write_text("__version__ = '0'\n")
    (package / "other.py").write_text("")
    (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .other import x\n"
                                    "def f():\n    from . import __version__\n    from .high import y\n")
    (package / "high.py").write_text("import fxdepass.other\nfrom fxdepass.rules import linear\n")
    (rules / "__init__.py").write_text("from . import linear\n")
    (rules / "linear.py").write_text("from ..registry import deflinear\nfrom .. import low\n")
    found = import_graph(package, rules)
    assert found == {"fxdepass": set(), "fxdepass.other": set(), "fxdepass.low": {"fxdepass", "fxdepass.high"},
                     "fxdepass.high": {"fxdepass.other", "fxdepass.rules.linear"},
                     "fxdepass.rules": {"fxdepass.rules.linear"}, "fxdepass.rules.linear": {"fxdepass.low"}}
    assert cycles(found) == [["fxdepass.high", "fxdepass.low", "fxdepass.rules.linear"]]


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert "fxdepass.api" in graph and "fxdepass.rules.linear" in graph
    assert cycles(graph) == []


def test_rules_import_no_runner(graph: dict[str, set[str]]) -> None:
    wrong = {m: sorted(t for t in targets if t in RUNNER | INSPECTION)
             for m, targets in graph.items() if m.startswith("fxdepass.rules")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_only_the_inspection_layer_imports_it(graph: dict[str, set[str]]) -> None:
    """The compiler, its results and everything below them never import graph, export, report or the CLI (the
    package's lazy names aside: fxdepass/__init__.py imports by name, when a name is used)."""
    wrong = {m: sorted(targets & INSPECTION) for m, targets in graph.items() if m not in INSPECTION}
    assert {m: t for m, t in wrong.items() if t} == {}
