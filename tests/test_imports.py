"""Layering: every module imports, and no two packages of megatron_puzzle import each other.

Shared pieces (activations, losses, metrics, the parallel state) sit below the stages, so the
package graph (every import counted, those inside functions too) must have no cycle.
"""

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import megatron_puzzle

ROOT = Path(megatron_puzzle.__file__).parent


def _package_of(module: str) -> str:
    """The subpackage of megatron_puzzle a module (or a name inside one) belongs to; <top> for cli.py etc."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else "<top>"


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of the megatron_puzzle modules `path` imports (anywhere in the file)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("megatron_puzzle.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _package_of(module)
        for name in _imports(path, module):
            dst = _package_of(name)
            if dst != src and "<top>" not in (src, dst):
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_package_imports_cycle():
    graph = package_graph()
    assert "score" in graph and "distill" in graph  # the walk sees the stages' imports
    cycle = find_cycle(graph)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_every_module_imports():
    """In a fresh interpreter, so no earlier test has imported anything for them."""
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], "megatron_puzzle.")
             if ".hf_modeling." not in m.name]  # the modeling code shipped with exports imports transformers' remote API
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    p = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def module_graph() -> dict[str, set[str]]:
    """megatron_puzzle module -> the modules (files, not packages' __init__) it imports, anywhere in the file."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out = set()
        for name in _imports(path, module):
            parts = name.split(".")
            while parts and not ROOT.parent.joinpath(*parts).with_suffix(".py").exists():
                parts = parts[:-1]  # `from pkg.mod import name` names pkg.mod; a package alone is no edge
            if parts and ".".join(parts) != module:
                out.add(".".join(parts))
        graph[module] = out
    return graph


def test_no_module_imports_cycle():
    """Within a package too (e.g. cost.measure <-> cost.decilm_runtime once): shared pieces go to a module below both."""
    graph = module_graph()
    assert "megatron_puzzle.cost.jobs" in graph["megatron_puzzle.cost.decilm_runtime"]  # the check sees real edges
    assert find_cycle(graph) is None
