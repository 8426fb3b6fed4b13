"""Every call that the GPU tests, tools and benchmarks make into the project fits its target's signature.

The GPU tests never run in CI (no GPU), and tools and benchmarks are not imported by the test suite, so a
renamed keyword in them would first show as a TypeError on a GPU node. This check reads their source (AST),
resolves names imported from the project (`from megatron_puzzle.x import f`, `import megatron_puzzle.x as m`,
the tests' `_models` helpers), the attributes reached from them (`m.f`, `Class.method`) and methods of
variables assigned from a project class (`x = Class(...); x.method(...)`), and binds each call's arguments
to the target's `inspect.signature` with placeholder values.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from _models import REPO

PROJECT_MODULES = ("megatron_puzzle", "_models", "_runs")
CHECKED = sorted((REPO / "tests" / "gpu").glob("*.py")) + sorted((REPO / "tools").glob("*.py")) \
    + sorted((REPO / "benchmarks").glob("*.py"))


@dataclass
class Call:
    where: str
    target: str
    error: str | None


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_MODULES


def _import_names(tree: ast.AST) -> dict[str, object]:
    """Names a file binds to project modules and objects (anywhere in the file; conflicting bindings dropped)."""
    names: dict[str, object] = {}
    conflicts = set()

    def bind(name, obj):
        if name in names and names[name] is not obj:
            conflicts.add(name)
        names[name] = obj

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _is_project(node.module):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                obj = getattr(mod, alias.name, None)
                if obj is None:  # a submodule imported by name
                    obj = importlib.import_module(f"{node.module}.{alias.name}")
                bind(alias.asname or alias.name, obj)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_project(alias.name):
                    mod = importlib.import_module(alias.name)
                    if alias.asname:
                        bind(alias.asname, mod)
                    else:  # `import a.b.c` binds `a`
                        bind(alias.name.split(".")[0], importlib.import_module(alias.name.split(".")[0]))
    for name in conflicts:
        del names[name]
    return names


def _resolve(expr: ast.expr, names: dict[str, object]):
    """The project object an expression names (Name or a chain of attributes), or None."""
    if isinstance(expr, ast.Name):
        return names.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, names)
        if base is None:
            return None
        return getattr(base, expr.attr, None)
    return None


def _scope_nodes(scope: ast.AST):
    """The nodes of one function (or the module) without those of functions nested in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _instances(scope: ast.AST, names: dict[str, object]) -> dict[str, type]:
    """Variables of one scope whose every binding is `x = Class(...)` with the same project class."""
    stores: dict[str, int] = {}
    made: dict[str, list] = {}
    for node in _scope_nodes(scope):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            stores[node.id] = stores.get(node.id, 0) + 1
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Call):
            made.setdefault(node.targets[0].id, []).append(_resolve(node.value.func, names))
    out = {}
    for name, classes in made.items():
        cls = classes[0]
        if inspect.isclass(cls) and _is_project(cls.__module__) and all(c is cls for c in classes) \
                and stores[name] == len(classes) and name not in names:
            out[name] = cls
    return out


def _target(call: ast.Call, names, instances):
    """The project callable (or a signature, or the lookup error) a call goes to; None if not the project's."""
    obj = _resolve(call.func, names)
    if obj is not None:
        mod = getattr(obj, "__module__", None) or ""
        if callable(obj) and not inspect.ismodule(obj) and _is_project(mod):
            return obj
        return None
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in instances:
        cls = instances[f.value.id]
        attr = inspect.getattr_static(cls, f.attr, None)
        if attr is None:
            if hasattr(cls, "__getattr__") or f"self.{f.attr}" in inspect.getsource(cls):
                return None  # an attribute set on the instance: its signature is not known here
            return AttributeError(f"{cls.__name__} has no attribute {f.attr!r}")
        if isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
            return getattr(cls, f.attr) if not inspect.isfunction(attr) else _bound(attr)
    return None


def _bound(func):
    """A plain function looked up on a class, called on an instance: drop `self`."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())[1:]
    return sig.replace(parameters=params)


def _signature(target) -> inspect.Signature | None:
    if isinstance(target, inspect.Signature):
        return target
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def check_source(source: str, where: str = "<snippet>") -> list[Call]:
    """Every call into the project in `source`, with the binding error if its arguments do not fit."""
    tree = ast.parse(source)
    names = _import_names(tree)
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    out = []
    for scope in scopes:
        out += _check_scope(scope, names, where)
    return sorted(out, key=lambda c: int(c.where.split(":")[1].split()[0]))


def _check_scope(scope: ast.AST, names: dict[str, object], where: str) -> list[Call]:
    instances = _instances(scope, names)
    out = []
    for node in _scope_nodes(scope):
        if not isinstance(node, ast.Call):
            continue
        target = _target(node, names, instances)
        if target is None:
            continue
        label = f"{where}:{node.lineno} {ast.unparse(node.func)}"
        if isinstance(target, Exception):
            out.append(Call(label, ast.unparse(node.func), str(target)))
            continue
        sig = _signature(target)
        if sig is None:
            continue
        starred = any(isinstance(a, ast.Starred) for a in node.args)
        double = any(k.arg is None for k in node.keywords)
        args = [] if starred else [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords if k.arg is not None}
        error = None
        try:
            if starred or double:  # an unknown count of arguments: check what is written out
                sig.bind_partial(*args, **kwargs)
            else:
                sig.bind(*args, **kwargs)
        except TypeError as e:
            error = str(e)
        out.append(Call(label, ast.unparse(node.func), error))
    return out


def _check_file(path: Path) -> list[Call]:
    return check_source(path.read_text(), str(path.relative_to(REPO)))


@pytest.fixture(scope="module", autouse=True)
def _importable():
    for d in (REPO / "tests", REPO / "tests" / "gpu"):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_calls_into_the_project_fit_their_signatures(path):
    calls = _check_file(path)
    bad = [f"{c.where}: {c.error}" for c in calls if c.error]
    assert not bad, "\n".join(bad)


def test_the_check_reaches_the_gpu_tests_calls():
    """Not vacuous: the GPU tests' calls into the cost, model and distill code are among those checked."""
    calls = _check_file(REPO / "tests" / "gpu" / "test_gpu_paths.py")
    targets = {c.target for c in calls}
    for expected in ("MeasuredCostModel", "AnalyticCostModel", "checkpoint.load", "gkd.GKDConfig",
                     "gkd.train_step", "m.variant_cost", "analytic.variant_cost", "tiny_parent", "NvmlMonitor"):
        assert expected in targets, (expected, sorted(targets))
    assert len(calls) >= 30, len(calls)


def test_the_check_catches_a_wrong_keyword():
    """The bug this check exists for: `min_time_s` passed where MeasuredCostModel takes `min_sample_s`."""
    snippet = textwrap.dedent("""
        from megatron_puzzle.cost.measure import MeasuredCostModel
        from megatron_puzzle.cost import measure as m

        def f(cfg, scenario):
            model = MeasuredCostModel(cfg, scenario, telemetry=False, min_time_s=0.2)
            model.variant_cost("attn_kv2", "extra")
            model.no_such_method()
            m.time_job(None, "cuda", 1, 2, 3)
            ok = MeasuredCostModel(cfg, scenario, min_sample_s=0.2)
            ok.measure(["ffn_64"])
    """)
    calls = check_source(snippet)
    errors = {c.target: c.error for c in calls if c.target != "MeasuredCostModel"}
    constructors = [c.error for c in calls if c.target == "MeasuredCostModel"]
    assert len(constructors) == 2 and "min_time_s" in constructors[0] and constructors[1] is None, constructors
    assert errors["model.variant_cost"] and errors["model.no_such_method"] and errors["m.time_job"], errors
    assert errors["ok.measure"] is None, errors
