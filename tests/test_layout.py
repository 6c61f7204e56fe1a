"""The shape of the code: the import graph has no cycles, and the method package stays free
of the orchestration libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixmae_core", "pipelines")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level imports count:
    a cycle through a lazy import is still a cycle), with the packages those run first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    # importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer lives inside them
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found |= {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)} - ancestors
    return {m for m in found if m in known and m != name}


def import_cycles() -> list[list[str]]:
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                cycles.append(stack[stack.index(child):] + [child])
            elif child not in state:
                visit(child, stack + [child])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_the_import_graph_has_no_cycles():
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "pipelines"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pipelines import b\n")
    (package / "b.py").write_text("def f():\n    from pipelines.a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("pipelines",))
    assert import_cycles() == [["pipelines.a", "pipelines.b", "pipelines.a"]]


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("mixmae_core", ("ray", "mlflow")),
        # unpickled by Ray Train's controller and DatasetManager in every stage: must stay light
        ("pipelines.stages.jobs", ("torch", "timm", "mlflow")),
        ("pipelines.stages.entry", ("torch", "timm", "mlflow")),
        ("pipelines.data.ray_internals", ("torch", "timm", "mlflow")),
        # the plan's arithmetic over a model's kept price
        ("pipelines.worker_memory", ("torch", "timm", "mlflow")),
        # the test session's last hook and every `mixmae` command's end
        ("pipelines.process_end", ("ray", "torch", "timm", "mlflow")),
    ],
)
def test_modules_import_only_what_their_processes_can_afford(module, forbidden):
    code = (
        "import sys, pkgutil, importlib\n"
        f"module = importlib.import_module({module!r})\n"
        "if hasattr(module, '__path__'):\n"
        "    for m in pkgutil.walk_packages(module.__path__, module.__name__ + '.'): importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "assert not bad, bad[:10]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
