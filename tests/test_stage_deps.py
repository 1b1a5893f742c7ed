"""Each DVC stage declares exactly the vqflow code it runs and the params it reads: DVC re-runs a stage when a
declared dependency changes, so an undeclared one is a change that goes unnoticed (stale outputs, a dvc.lock
that does not describe the code), and a needless one re-runs work for nothing.

The code a stage runs is found statically: the stage function in vqflow/stages.py, the stages.py helpers it calls,
the vqflow modules all of those import (at module level or inside a function), and transitively everything
those modules import. The params a stage reads are recorded at run time: each stage function runs on a tiny
project with params that log the dotted path of every key read (a whole section when it is iterated or copied)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
        todo += [
            c.func.id
            for c in ast.walk(functions[name])
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in functions
        ]
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
    patched = original.replace(
        "    from .data.synthetic import generate as write_dataset\n",
        "    from .data.synthetic import generate as write_dataset\n    from .metrics import auroc\n",
        1,
    )
    assert patched != original
    missing, _ = missing_and_needless("generate", spec, patched)
    assert "vqflow/metrics.py" in missing


# Read by a stage but not a dependency: they change how fast or where it runs, not what it writes.
NOT_DEPENDENCIES = {
    "features.device": "the device; features are compared to 1e-5 across devices, not bitwise",
    "features.batch_size": "images decoded per forward pass: one image's features do not depend on its batch",
    "train.device": "the device",
    "evaluate.device": "the device",
    "train.checkpoint_every": "resuming reproduces the uninterrupted run (tests/test_train.py)",
    "train.loader_workers": "processes reading batches ahead: streamed training is identical (tests/test_train.py)",
    "outputs.checkpoints": "where resumable checkpoints go (not an output)",
    "outputs.timing": "wall-clock figures (vqflow/timing.py): not an output",
    "validate.docs": "the Great Expectations Data Docs (carry run times): not an output",
}
STAGE_ORDER = ("generate", "prepare", "validate", "features", "train", "evaluate", "export")


class ParamsReads(dict):
    """params that record the dotted path of every key read; iterating or copying a section reads all of it."""

    def __init__(self, data: dict, reads: set[str], path: str = ""):
        super().__init__(data)
        self.reads, self.path = reads, path

    def _path(self, key) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, dict):
            return ParamsReads(value, self.reads, self._path(key))
        self.reads.add(self._path(key))
        return value

    def get(self, key, default=None):
        if super().__contains__(key):
            return self[key]
        self.reads.add(self._path(key))  # an absent key read with a default: setting it changes the stage
        return default

    def _whole(self) -> None:
        self.reads.add(self.path or "*")

    def __iter__(self):
        self._whole()
        return super().__iter__()

    def keys(self):
        self._whole()
        return super().keys()

    def items(self):
        self._whole()
        return super().items()

    def values(self):
        self._whole()
        return super().values()


def record_reads(root: str) -> dict[str, list[str]]:
    """Run every stage function on a tiny project in ``root``; the params keys each one read."""
    from vqflow import stages
    from vqflow.testing import tiny_params

    os.chdir(root)
    params = tiny_params(Path(root))
    reads = {}
    for name in STAGE_ORDER:
        seen: set[str] = set()
        getattr(stages, name)(ParamsReads(params, seen))
        reads[name] = sorted(seen)
    return reads


def leaves(tree: dict, path: str) -> set[str]:
    """The leaf keys of params.yaml under ``path`` (``path`` itself when it is a leaf or absent)."""
    node = tree
    for part in path.split("."):
        if not (isinstance(node, dict) and part in node):
            return {path}
        node = node[part]
    if isinstance(node, dict) and node:
        return set().union(*(leaves(tree, f"{path}.{key}") for key in node))
    return {path}


def declared_params(spec: dict) -> list[str]:
    """The stage's params entries plus the keys its paths interpolate (``${outputs.model}``): DVC tracks those."""
    interpolated = re.findall(r"\$\{([\w.]+)\}", json.dumps({k: v for k, v in spec.items() if k != "params"}))
    return [*spec.get("params", []), *interpolated]


def params_missing_and_needless(reads: list[str], declared: list[str], tree: dict) -> tuple[list[str], list[str]]:
    """Leaf keys read but not declared, and declared but not read (a declared section stands for all its keys).
    ``model.name`` picks which ``model.<section>`` is read: a stage that reads it depends on all of ``model``."""
    reads = ["model" if r == "model.name" else r for r in reads]
    needed = set().union(set(), *(leaves(tree, r) for r in reads)) - set(NOT_DEPENDENCIES)
    covered = set().union(set(), *(leaves(tree, d) for d in declared))
    return sorted(needed - covered), sorted(covered - needed)


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory) -> dict[str, list[str]]:
    """Recorded in a process of its own: the export stage writes into the BentoML store of BENTOML_HOME."""
    root = tmp_path_factory.mktemp("reads")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from tests.test_stage_deps import record_reads; "
            "print(json.dumps(record_reads(sys.argv[1])))",
            str(root),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_stage_declares_exactly_the_params_it_reads(stage_reads):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(stage_reads) == set(stages)
    problems = {}
    for stage, reads in stage_reads.items():
        missing, needless = params_missing_and_needless(reads, declared_params(stages[stage]), tree)
        if missing or needless:
            problems[stage] = {"undeclared": missing, "needless": needless, "read": reads}
    assert not problems, problems


def test_the_params_check_sees_an_undeclared_and_a_needless_key(stage_reads):
    """The check can fail: a key read but not declared, and a declared section nobody reads, are reported."""
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    reads = stage_reads["evaluate"]
    declared = declared_params(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"])
    assert params_missing_and_needless(reads, declared, tree) == ([], [])
    assert params_missing_and_needless(reads, [d for d in declared if d != "evaluate.max_fpr"], tree)[0] == [
        "evaluate.max_fpr"
    ]
    assert params_missing_and_needless(reads, [*declared, "features.batch_size"], tree)[1] == ["features.batch_size"]
    # a stage that reads a key through iteration reads the whole section
    seen: set[str] = set()
    dict(ParamsReads({"a": {"b": 1, "c": 2}}, seen)["a"])
    assert "a" in seen
