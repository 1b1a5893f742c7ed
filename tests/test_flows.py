"""The Prefect flows on a tiny generated dataset in a temporary git + DVC repo (Prefect's ephemeral server)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, tiny_params


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowrepo")
    home = tmp_path_factory.mktemp("homes")
    os.environ.update({"BENTOML_HOME": str(home / "bentoml"), "PREFECT_HOME": str(home / "prefect"),
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "vqflow", root / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    params = tiny_params(Path("."))  # paths relative to the repo, as in the project's params.yaml
    params["prepare"]["sources"] = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["sources"]  # the project's
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "ci@example.com")
    _git(root, "config", "user.name", "ci")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    shutil.copy(ROOT / ".dvc/config", root / ".dvc/config")  # the project's: autostage on, the S3 remote
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "project")
    return root


def _added(repo) -> list[str]:
    folder = repo / "data/added/wood"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _manifest_rows(repo):
    return len((repo / "data/manifest.csv").read_text().splitlines()) - 1


def test_pipeline_flow_runs_every_stage_and_reports(repo):
    from flows.pipeline import pipeline

    metrics = pipeline(str(repo))
    assert set(metrics["per_category"]) == {"wood", "chip"}
    assert (repo / "models/model/model.safetensors").is_file() and (repo / "metrics/export.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"generate", "prepare", "validate", "features", "train", "evaluate", "export"} <= set(lock["stages"])
    record = json.loads((repo / "metrics/export.json").read_text())
    assert record["role"] == "champion", record  # a committed run on main promotes
    assert json.loads((repo / "registry/champions.json").read_text())[-1]["tag"] == record["tag"]
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first run")


def test_an_experiment_never_changes_the_champion(repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    record = (repo / "registry/champions.json").read_text()
    env = {k: v for k, v in os.environ.items() if k != "DVC_EXP_NAME"}
    run = subprocess.run([dvc, "exp", "run", "-S", "model.name=cflow", "-S", "++model.cflow.coupling_blocks=2",
                          "-S", "++model.cflow.pe_channels=16", "-S", "++model.cflow.chunk_size=64"],
                         cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["role"] == "challenger" and any("experiments never promote" in r for r in export["reasons"]), export
    assert (repo / "registry/champions.json").read_text() == record
    _git(repo, "checkout", "HEAD", "--", ".")  # back to the committed run for the next tests
    subprocess.run([dvc, "checkout", "--quiet"], cwd=repo, env=env, capture_output=True)


def _new_normals(repo, count, start):
    from vqflow.data.synthetic import render_sample

    (repo / "data/inbox/wood").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _, _ = render_sample("wood", "train", start + i, size=64)
        path = repo / f"data/inbox/wood/new_{start + i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_retrain_validates_quarantines_versions_and_promotes_only_if_not_worse(repo):
    from flows.retrain import retrain
    from vqflow.registry import champion

    before_rows = _manifest_rows(repo)
    champion_before = champion(repo / "registry/champions.json")["tag"]
    from flows.retrain import content_copy

    new = _new_normals(repo, 2, 500)
    expected = sorted(content_copy(repo, p).name for p in new)  # named by content: a rerun cannot duplicate them
    (repo / "data/inbox/wood/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = retrain(str(repo), push=False)
    reason = (repo / "data/quarantine/wood/corrupt.png.reason.txt").read_text()
    assert "decodable" in reason
    assert _added(repo) == expected
    assert not any(p.exists() for p in new), "accepted images leave the inbox after success"
    assert _manifest_rows(repo) == before_rows + 2
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True).stdout
    assert "retrain: add 2 validated normal images" in log
    record = json.loads((repo / "metrics/export.json").read_text())
    assert result["status"] == record["role"]
    expected = record["tag"] if record["role"] == "champion" else champion_before
    assert champion(repo / "registry/champions.json")["tag"] == expected


def test_a_killed_run_is_finished_by_the_next_one(repo):
    """The state a kill -9 after the data commit leaves (copies committed, inbox full, no pipeline run): the next
    run neither quarantines the images as duplicates of themselves nor adds them twice."""
    from flows.retrain import add_to_dataset, content_copy, retrain, version_data

    new = _new_normals(repo, 2, 700)
    added_before = _added(repo)
    names = [content_copy(repo, p).name for p in new]
    add_to_dataset.fn(str(repo), [str(p) for p in new])
    version_data.fn(str(repo), 2, False)
    result = retrain(str(repo), push=False)
    assert result["status"] in ("champion", "challenger"), result
    assert _added(repo) == sorted(added_before + names)  # each exactly once
    assert not any(p.exists() for p in new) and not (repo / "data/quarantine/wood/new_700.png").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "", status


def test_retrain_with_an_empty_inbox_does_nothing(repo):
    from flows.retrain import retrain

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    assert retrain(str(repo), push=False) == {"status": "empty"}
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout == head


def test_a_failing_train_leaves_inbox_dataset_and_champion_unchanged(repo):
    from flows.retrain import retrain
    from vqflow.registry import champion

    champion_before = champion(repo / "registry/champions.json")["tag"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = -1.0  # Adam refuses: the train stage fails
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-q", "-am", "break training")
    added_before = _added(repo)
    new = _new_normals(repo, 1, 600)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    with pytest.raises(Exception, match="stage train failed"):
        retrain(str(repo), push=False)
    assert all(p.exists() for p in new), "the inbox keeps its images"
    assert _added(repo) == added_before
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "", f"the rollback leaves a clean checkout (autostage on): {status}"
    assert champion(repo / "registry/champions.json")["tag"] == champion_before
    tree = subprocess.run(["git", "diff", head.strip(), "--stat", "--", "data/added.dvc"], cwd=repo,
                          capture_output=True, text=True).stdout
    assert tree == "", "the data commit was reverted"


def test_stage_cache_key_follows_the_declared_inputs(tmp_path):
    from flows.pipeline import stage_cache_key

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "vqflow train", "deps": ["data/features"], "params": ["train", "prepare.manifest"],
        "outs": ["models/model"]}}}))
    (tmp_path / "data/features").mkdir(parents=True)
    (tmp_path / "data/features/a.bin").write_bytes(b"one")
    params = {"train": {"lr": 1e-3}, "prepare": {"manifest": "m.csv", "seed": 0}, "evaluate": {"x": 1}}
    args = {"stage": "train", "repo": str(tmp_path), "params": params}
    assert stage_cache_key(None, args) is None, "no cached result while the output is missing"
    (tmp_path / "models/model").mkdir(parents=True)
    key = stage_cache_key(None, args)
    assert key == stage_cache_key(None, args)
    assert stage_cache_key(None, {**args, "params": {**params, "evaluate": {"x": 2}}}) == key  # not declared
    assert stage_cache_key(None, {**args, "params": {**params, "train": {"lr": 2e-3}}}) != key
    (tmp_path / "data/features/a.bin").write_bytes(b"two")
    assert stage_cache_key(None, args) != key


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from flows.pipeline import StageFailed, StageInputError, TransientStageError, _transient
    from vqflow.stages import DataValidationError

    assert _transient(None, None, Failed(data=TransientStageError("storage unreachable")))
    assert not _transient(None, None, Failed(data=DataValidationError("bad data")))
    assert not _transient(None, None, Failed(data=StageInputError("bad param")))
    assert not _transient(None, None, Failed(data=StageFailed("a bug")))


@pytest.mark.parametrize("exit_code,attempts,error", [(75, 3, "TransientStageError"), (2, 1, "StageInputError"),
                                                      (1, 1, "DataValidationError"), (70, 1, "StageFailed")])
def test_a_stage_is_retried_only_when_its_exit_code_says_transient(tmp_path, exit_code, attempts, error):
    from prefect import flow

    from flows.pipeline import run_stage

    counter = tmp_path / "attempts.txt"
    command = f"{sys.executable} -c \"open(r'{counter}', 'a').write('x'); print('working'); raise SystemExit({exit_code})\""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"step": {"cmd": command, "outs": ["out.txt"]}}}))
    _git(tmp_path, "init", "-q", "-b", "main")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)

    @flow
    def one_stage() -> tuple[bool, str, str]:
        state = run_stage.with_options(retry_delay_seconds=0)("step", str(tmp_path), {}, False, return_state=True)
        exc = state.result(raise_on_failure=False)
        return state.is_failed(), type(exc).__name__, str(exc)

    failed, name, message = one_stage()
    assert failed and name == error and f"exit {exit_code}" in message and "working" in message
    assert counter.read_text() == "x" * attempts
