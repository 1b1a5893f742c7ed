"""The Prefect flows on a tiny generated dataset in a temporary git + DVC repo (Prefect's ephemeral server)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.faults import new_normals, scratch_repo
from tests.conftest import _inbox_normals, _added, _git, _git_status, flow_repo

pytestmark = pytest.mark.slow  # Prefect flow runs on a git + DVC repository, retraining
# (the kill -9 and approval runs are files of their own: test_flows_kill.py, test_flows_approval.py)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return flow_repo(tmp_path_factory)


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
    run = subprocess.run(
        [
            dvc,
            "exp",
            "run",
            "-S",
            "model.name=cflow",
            "-S",
            "++model.cflow.coupling_blocks=2",
            "-S",
            "++model.cflow.pe_channels=16",
            "-S",
            "++model.cflow.chunk_size=64",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["role"] == "challenger" and any("experiments never promote" in r for r in export["reasons"]), export
    assert (repo / "registry/champions.json").read_text() == record
    _git(repo, "checkout", "HEAD", "--", ".")  # back to the committed run for the next tests
    subprocess.run([dvc, "checkout", "--quiet"], cwd=repo, env=env, capture_output=True)


def test_retrain_takes_feedback_from_an_s3_inbox_at_most_the_cap_per_category(repo):
    """Three confirmed normals sent as feedback to an S3 inbox (one of them twice) and retrain.max_per_category 2:
    the run takes the two oldest, adds each once with its record, reports them as feedback with the false
    rejects, and removes exactly those objects from the store; the newest waits for the next run."""
    import boto3

    from flows.retrain import retrain
    from vqflow.feedback import FeedbackStore
    from vqflow.testing import moto_s3, s3_env

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["retrain"] = {"max_per_category": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-qam", "retrain: at most 2 images per category and run")
    added_before = set(_added(repo))
    sent = new_normals(repo.parent / f"{repo.name}-operator", 3, 800)
    saved = dict(os.environ)
    with moto_s3() as endpoint:
        os.environ.update(s3_env(endpoint))
        try:
            boto3.client("s3").create_bucket(Bucket="line")
            store = FeedbackStore("s3://line/inbox")
            stored = [
                store.put(
                    path.read_bytes(),
                    "PNG",
                    "wood",
                    "normal",
                    score=9.0,
                    is_anomaly=True,
                    received_at=f"2026-11-0{i + 1}T08:00:00Z",
                )
                for i, path in enumerate(sent)
            ]
            assert store.put(sent[0].read_bytes(), "PNG", "wood", "normal").duplicate
            result = retrain(str(repo), inbox="s3://line/inbox", push=False)
            remaining = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="line")["Contents"])
        finally:
            os.environ.clear()
            os.environ.update(saved)
    newest = Path(stored[2].location).name
    assert (
        result["from_feedback"] == 2
        and len(result["added"]) == 2
        and [Path(p).name for p in result["deferred"]] == [newest]
    )
    assert remaining == [f"inbox/wood/{newest}", f"inbox/wood/{newest}.json"]
    added = set(_added(repo)) - added_before
    taken = {Path(s.location).name for s in stored[:2]}
    assert added == taken | {name + ".json" for name in taken}  # each image once, with its feedback record
    report = result["false_rejects"]["wood"]
    assert report["feedback"] == 2 and report["rejected_when_sent"] == 2 and 0 <= report["rejected_now"] <= 2
    assert report["test_frr_before"] is not None and report["test_frr_after"] is not None
    assert report.get("in_train", 0) + report.get("in_val", 0) == 2
    assert _git_status(repo) == ""


def test_retrain_with_an_empty_inbox_does_nothing(repo):
    from flows.retrain import retrain

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    assert retrain(str(repo), push=False) == {"status": "empty"}
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout == head


def test_a_failing_train_leaves_inbox_dataset_and_champion_unchanged(repo):
    from flows.retrain import retrain
    from vqflow.model_store import champion

    champion_before = champion(repo / "registry/champions.json")["tag"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = -1.0  # Adam refuses: the train stage fails
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-q", "-am", "break training")
    added_before = _added(repo)
    new = _inbox_normals(repo, 1, 600)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    with pytest.raises(Exception, match="stage train failed"):
        retrain(str(repo), push=False)
    assert all(p.exists() for p in new), "the inbox keeps its images"
    assert _added(repo) == added_before
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "", f"the rollback leaves a clean checkout (autostage on): {status}"
    assert champion(repo / "registry/champions.json")["tag"] == champion_before
    tree = subprocess.run(
        ["git", "diff", head.strip(), "--stat", "--", "data/added.dvc"], cwd=repo, capture_output=True, text=True
    ).stdout
    assert tree == "", "the data commit was reverted"


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from flows.pipeline import StageFailed, StageInputError, TransientStageError, _transient
    from vqflow.stages import DataValidationError

    assert _transient(None, None, Failed(data=TransientStageError("storage unreachable")))
    assert not _transient(None, None, Failed(data=DataValidationError("bad data")))
    assert not _transient(None, None, Failed(data=StageInputError("bad param")))
    assert not _transient(None, None, Failed(data=StageFailed("a bug")))


@pytest.mark.parametrize(
    "exit_code,attempts,error",
    [(75, 3, "TransientStageError"), (2, 1, "StageInputError"), (1, 1, "DataValidationError"), (70, 1, "StageFailed")],
)
def test_a_stage_is_retried_only_when_its_exit_code_says_transient(tmp_path, exit_code, attempts, error):
    from prefect import flow

    from flows.pipeline import run_stage

    counter = tmp_path / "attempts.txt"
    command = (
        f"{sys.executable} -c \"open(r'{counter}', 'a').write('x'); print('working'); raise SystemExit({exit_code})\""
    )
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"step": {"cmd": command, "outs": ["out.txt"]}}}))
    _git(tmp_path, "init", "-q", "-b", "main")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)

    @flow
    def one_stage() -> tuple[bool, str, str]:
        state = run_stage.with_options(retry_delay_seconds=0)("step", str(tmp_path), False, return_state=True)
        exc = state.result(raise_on_failure=False)
        return state.is_failed(), type(exc).__name__, str(exc)

    failed, name, message = one_stage()
    assert failed and name == error and f"exit {exit_code}" in message and "working" in message
    assert counter.read_text() == "x" * attempts


def test_the_inbox_check_of_a_bare_clone_makes_the_manifest_first(tmp_path):
    """A clone before `dvc pull` / `dvc repro` has no data/manifest.csv: the retrain flow runs the prepare stage
    (it was a bare FileNotFoundError)."""
    from flows.retrain import check_inbox

    repo = scratch_repo(tmp_path)
    assert not (repo / "data/manifest.csv").exists()
    inbox = tmp_path / "inbox"
    fresh = new_normals(inbox, 2, 900)
    verdict = check_inbox.fn(str(repo), str(inbox))
    assert (repo / "data/manifest.csv").is_file()
    assert verdict["accepted"] == sorted(str(p) for p in fresh) and verdict["rejected"] == {}
