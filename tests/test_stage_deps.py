"""Each DVC stage declares exactly the vqflow code it runs and the params it reads: DVC re-runs a stage when a
declared dependency changes, so an undeclared one is a change that goes unnoticed (stale outputs, a dvc.lock
that does not describe the code), and a needless one re-runs work for nothing.

The code a stage runs is found statically (vqflow/code.py): its module vqflow/stages/<stage>.py, the vqflow
modules it imports (at module level or inside a function), and transitively everything those modules import. The params a stage reads are recorded at run time: each stage function runs on a tiny
project with params that log the dotted path of every key read (a whole section when it is iterated or copied)."""

from __future__ import annotations

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


def stage_modules(stage: str, stage_source: str | None = None) -> list[str]:
    """The files the `vqflow <stage>` stage runs (vqflow.code: its module's static import closure); with
    ``stage_source``, the stage module's text is that instead of its file."""
    from vqflow.code import stage_files

    return stage_files(stage, ROOT, {f"vqflow.stages.{stage}": stage_source} if stage_source else None)


def declared_code(spec: dict) -> list[str]:
    return [d for d in spec.get("deps", []) if d.startswith("vqflow")]


def missing_and_needless(stage: str, spec: dict, stage_source: str | None = None) -> tuple[list[str], list[str]]:
    files = set(stage_modules(stage, stage_source))
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
    original = (PACKAGE / "stages/generate.py").read_text()
    assert missing_and_needless("generate", spec) == ([], [])
    patched = original.replace(
        "    from ..data.synthetic import generate as write_dataset\n",
        "    from ..data.synthetic import generate as write_dataset\n    from ..metrics import auroc\n",
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
    for name in stages.ORDER:
        seen: set[str] = set()
        stages.run(name, ParamsReads(params, seen))
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


# modules that do not make the weights: an edit must not retrain (nor extract, none is the extractor's)
NOT_TRAINING = (
    "vqflow/thresholds.py",
    "vqflow/onnx_graph.py",
    "vqflow/bundle.py",
    "vqflow/plots.py",
    "vqflow/metrics.py",
    "vqflow/report.py",
    "vqflow/model_store.py",
    "vqflow/stages/calibrate.py",
    "vqflow/stages/package.py",
    "vqflow/stages/evaluate.py",
    "vqflow/stages/export.py",
    "vqflow/data/visa.py",  # a dataset reader the run does not use
)


def _dvc(repo: Path, *args: str) -> str:
    run = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def _stale(repo: Path, target: str) -> set[str]:
    """The stages `dvc status` lists for ``target`` and the stages before it."""
    return set(json.loads(_dvc(repo, "status", "--json", "--with-deps", target) or "{}"))


@pytest.mark.slow
def test_an_edit_outside_training_code_retrains_nothing(tmp_path, monkeypatch):
    """A tiny project reproduced up to train; a comment line appended to each module that does not make the weights
    leaves features and train up to date; the same line in the flows' code makes train stale. Fails on the
    dvc.yaml of one stage that trained, calibrated and packaged (train listed 24 files)."""
    from flows.faults import scratch_repo

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "repo").mkdir()
    repo = scratch_repo(tmp_path / "repo")
    _dvc(repo, "repro", "--quiet", "train")
    assert not _stale(repo, "train")
    for module in NOT_TRAINING:
        with open(repo / module, "a") as handle:
            handle.write("# a comment\n")
    # prepare runs every reader (whichever kinds prepare.sources names): it re-runs on the unused reader's edit,
    # writes the same manifest, and nothing after it runs for that
    assert _stale(repo, "train") == {"prepare"}
    with open(repo / "vqflow/models/flows.py", "a") as handle:
        handle.write("# a comment\n")
    assert _stale(repo, "train") == {"prepare", "train"}
