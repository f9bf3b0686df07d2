"""The package's layering, read from the source: no import cycles, dependencies point one way.

    errors, parsing, clock, config, dtypes, tolerances, files, progress, demo, gguf_file, models → artifact → text → parallel → model
        → export → backends → runner → engine → validate → commands, job → serve → cli

Every `import` and `from ... import` of a `llama_export` module counts, also the ones inside functions
(a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llama_export"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "parsing", "clock", "config", "dtypes", "tolerances", "files", "progress", "demo",
     "gguf_file", "models"),
    ("artifact",),
    ("text",),
    ("parallel",),
    ("model",),
    ("export",),
    ("backends",),
    ("runner",),
    ("engine",),
    ("validate",),
    ("commands", "job"),
    ("serve",),
    ("cli",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The llama_export module that `name` (a module, or a module attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps: set[str] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if t == "llama_export" or t.startswith("llama_export."):
                    r = _resolve(t, modules)
                    if r and r != mod:
                        deps.add(r)
        graph[mod] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_between_files():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        packages.setdefault(_top(mod), set()).update(_top(d) for d in deps if _top(d) != _top(mod))
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


def test_every_top_level_module_has_a_layer():
    assert {_top(m) for m in _modules()} <= set(LAYER_OF), "add new top-level modules to LAYERS (and docs/design.md)"


def test_dependencies_point_one_way():
    upward = sorted(f"{mod} imports {dep}" for mod, deps in import_graph().items() for dep in deps
                    if LAYER_OF[_top(dep)] > LAYER_OF[_top(mod)])
    assert not upward, "\n".join(upward)


def test_the_checker_catches_a_cycle_and_an_upward_import():
    """Guards the tests above: they do find what they look for."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert LAYER_OF["runner"] > LAYER_OF["export"]  # so `export` importing `runner` is reported


@pytest.mark.parametrize("module", ["llama_export.cli", "llama_export.job", "llama_export.commands.run"])
def test_importing_never_imports_onnxruntime_or_tensorrt(module):
    code = f"import sys, {module}; print([m for m in ('onnxruntime', 'tensorrt', 'triton') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
