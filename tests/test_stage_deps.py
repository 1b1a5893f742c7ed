"""Each DVC stage declares exactly the vqflow code its stage function runs: DVC re-runs a stage when a
declared dependency changes, so an undeclared module is a change that goes unnoticed (stale outputs, a dvc.lock
that does not describe the code), and a needless one re-runs work for nothing.

The code a stage runs is found statically: the stage function in vqflow/stages.py, the stages.py helpers it calls,
the vqflow modules all of those import (at module level or inside a function), and transitively everything
those modules import."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGE = ROOT / "vqflow"


def _file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported(node: ast.AST, module: str) -> set[str]:
    """vqflow modules imported anywhere under ``node`` of ``module``'s source."""
    package = module if _file(module) and _file(module).name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom):
            if item.level:
                base = package.rsplit(".", item.level - 1)[0] if item.level > 1 else package
                target = f"{base}.{item.module}" if item.module else base
            else:
                target = item.module or ""
            if not target.startswith("vqflow"):
                continue
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in item.names if _file(f"{target}.{alias.name}")}
        elif isinstance(item, ast.Import):
            found |= {alias.name for alias in item.names if alias.name.startswith("vqflow")}
    return {m for m in found if _file(m)}


def _closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # a submodule import runs its packages
        todo += list(_imported(ast.parse(_file(module).read_text()), module))
    return seen


def stage_modules(stage: str, stages_source: str | None = None) -> set[str]:
    """Every vqflow module the `vqflow <stage>` stage function runs (stages.py, or ``stages_source`` as its text)."""
    tree = ast.parse(stages_source or (PACKAGE / "stages.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    reached, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [c.func.id for c in ast.walk(functions[name]) if isinstance(c, ast.Call)
                 and isinstance(c.func, ast.Name) and c.func.id in functions]
    top_level = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    direct = _imported(top_level, "vqflow.stages")
    for name in reached:
        direct |= _imported(functions[name], "vqflow.stages")
    return _closure(direct) | {"vqflow.stages"}  # stages.py itself, not every other stage's imports


def declared_code(spec: dict) -> list[str]:
    return [d for d in spec.get("deps", []) if d.startswith("vqflow")]


def missing_and_needless(stage: str, spec: dict, stages_source: str | None = None) -> tuple[list[str], list[str]]:
    files = {str(_file(m).relative_to(ROOT)) for m in stage_modules(stage, stages_source)}
    declared = declared_code(spec)
    covered = lambda file, dep: file == dep or file.startswith(dep.rstrip("/") + "/")  # noqa: E731
    missing = sorted(f for f in files if not any(covered(f, d) for d in declared))
    needless = sorted(d for d in declared if not any(covered(f, d) for f in files))
    return missing, needless


def test_every_stage_declares_exactly_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = {}
    for stage, spec in stages.items():
        missing, needless = missing_and_needless(stage, spec)
        if missing or needless:
            problems[stage] = {"undeclared": missing, "needless": needless}
    assert not problems, problems


def test_the_check_sees_a_module_a_stage_imports():
    """The check can fail: a stage function that imports one more module is reported."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["generate"]
    original = (PACKAGE / "stages.py").read_text()
    assert missing_and_needless("generate", spec) == ([], [])
    patched = original.replace("    from .data.synthetic import generate as write_dataset\n",
                               "    from .data.synthetic import generate as write_dataset\n    from .metrics import auroc\n", 1)
    assert patched != original
    missing, _ = missing_and_needless("generate", spec, patched)
    assert "vqflow/metrics.py" in missing
