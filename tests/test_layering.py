"""odise_core's import graph: no cycle, no import of backend, and the network below the predictor and training."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "odise_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """odise_core modules (and any backend import) that `path` imports anywhere, TYPE_CHECKING and
    function-level imports included: a cycle through them is still a tangle."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in known or name.split(".")[0] == "backend":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"odise_core.predictor", "odise_core.modeling.odise", "odise_core.training.losses",
            "odise_core.tools.evaluation"} <= set(graph)
    assert "odise_core.modeling.odise" in graph["odise_core.predictor"]
    assert "odise_core.training.losses" in graph["odise_core.training.finetune"]


def test_no_import_cycle_in_odise_core():
    assert find_cycle(import_graph()) is None


def test_odise_core_never_imports_backend():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] == "backend") for m, deps in import_graph().items()}
    assert {m: d for m, d in offenders.items() if d} == {}


@pytest.mark.parametrize("layer, above", [
    ("odise_core.modeling", ("odise_core.predictor", "odise_core.training", "odise_core.tools",
                             "odise_core.reference_mode", "odise_core.postprocess")),
    ("odise_core.training", ("odise_core.predictor", "odise_core.tools")),
    ("odise_core.tools", ("odise_core.predictor", "odise_core.modeling", "odise_core.training")),
])
def test_layers_import_only_downwards(layer, above):
    """The network knows nothing of images-in/segments-out, training or tools; tools need no model."""
    upward = {m: sorted(d for d in deps if d.startswith(above))
              for m, deps in import_graph().items() if m.startswith(layer)}
    assert {m: d for m, d in upward.items() if d} == {}


def test_every_module_imports_alone_without_backend():
    """Each module imports first in a fresh interpreter (an import-order cycle would fail here) and none
    pulls in backend."""
    modules = sorted(import_graph())
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('odise_core')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "    assert not any(m.split('.')[0] == 'backend' for m in sys.modules), name\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
