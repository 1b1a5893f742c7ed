"""The Prefect flows on a tiny generated dataset in a temporary git + DVC repo (Prefect's ephemeral server)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.faults import new_normals, scratch_repo
from tests.conftest import prefect_server

pytestmark = (
    pytest.mark.slow
)  # Prefect flow runs on a git + DVC repository, retraining (kill -9 at 7 points, approvals)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowrepo")
    home = tmp_path_factory.mktemp("homes")
    os.environ.update(
        {
            "BENTOML_HOME": str(home / "bentoml"),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
    )
    scratch_repo(root)
    return root


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server for the flow runs this module starts as processes of their own: each would otherwise start
    (and lose to kill -9) an ephemeral server of its own, ~10 s a run; bench/fault_injection.py kills runs with
    their ephemeral server."""
    with prefect_server({**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server"))}) as url:
        yield url


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


def _new_normals(repo, count, start):
    return new_normals(repo / "data/inbox", count, start)


def test_retrain_quarantines_versions_promotes_and_survives_a_kill_9_anywhere(repo, prefect_api):
    """Two new normal images and a corrupt one. kill -9 of the flow's process group at 6 points of one retrain
    (each next run gets one point further, after the recovery every run starts with), then at a 7th point after
    it landed on main (a complete run), then a run that finds the landed images still in the inbox: nothing is
    lost, duplicated or half-committed, the corrupt image is quarantined with its reason, the model is promoted
    only if not worse. bench/fault_injection.py: each kill point followed by a full second run."""
    from flows.retrain import recover
    from flows.faults import KILL_POINTS, check_invariants, committed_digests, digest, run_retrain

    champion_before = json.loads((repo / "registry/champions.json").read_text())[-1]["tag"]
    main_before = subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout
    rows_before = _manifest_rows(repo)
    new = _new_normals(repo, 2, 700)
    images = {digest(p): p.name for p in new}
    (repo / "data/inbox/wood/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name, marker, delay in KILL_POINTS:
        run = run_retrain(repo, marker, delay, api_url=prefect_api)
        assert run.killed, f"{name}: the flow never printed {marker!r} (exit {run.returncode}):\n{run.output[-4000:]}"
        recover.fn(str(repo))  # the first step of the next run, checked on its own
        landed = name == "after landing"
        problems = check_invariants(
            repo, images, repo / "data/inbox", champion_before, promoted_by_completed_run=landed
        )
        assert not problems, f"killed {name}: {problems}"
        main = subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout
        assert (main != main_before) == landed, f"killed {name}: main moved {main_before} -> {main}"
    assert sorted(committed_digests(repo)) == sorted(committed_digests(repo, main_before.strip()) + list(images))
    # the kill after landing may come before or after the inbox was cleaned (no push here: microseconds apart);
    # the state it leaves at worst, made exactly: committed images still in the inbox
    for path, content in zip(new, [committed_copy(repo, sha) for sha in images]):
        path.write_bytes(content)
    final = run_retrain(repo, api_url=prefect_api)
    assert final.returncode == 0 and "already committed by an interrupted run" in final.output, final.output[-4000:]
    assert "Running stage" not in final.output, "no second training for images main already holds"
    assert not any(p.exists() for p in new)
    assert not check_invariants(repo, images, repo / "data/inbox", champion_before, promoted_by_completed_run=True)
    assert subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout == main
    assert "decodable" in (repo / "data/quarantine/wood/corrupt.png.reason.txt").read_text()
    assert _manifest_rows(repo) == rows_before + 2
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True).stdout
    assert "retrain: add 2 validated normal images" in log
    record = json.loads((repo / "metrics/export.json").read_text())
    promoted = record["tag"] if record["role"] == "champion" else champion_before
    assert json.loads((repo / "registry/champions.json").read_text())[-1]["tag"] == promoted


def committed_copy(repo, sha: str) -> bytes:
    """The bytes of the image in data/added whose sha256 is ``sha``."""
    from flows.faults import digest

    return next(p.read_bytes() for p in (repo / "data/added").rglob("*") if p.is_file() and digest(p) == sha)


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


def _paused_retrain(repo, api_url):
    """A retrain run in a thread of its own, and its run once it pauses for an answer."""
    import threading
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import approval
    from flows.faults import run_retrain

    done = {}
    thread = threading.Thread(target=lambda: done.update(run=run_retrain(repo, api_url=api_url)))
    thread.start()
    with temporary_settings({PREFECT_API_URL: api_url}):
        deadline = time.monotonic() + 600
        while not (waiting := approval.waiting_runs()) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(1)
        question = approval.question(waiting[0]) if waiting else None
    return thread, done, (waiting[0] if waiting else None), question


def test_a_required_approval_pauses_with_the_diff_and_does_what_the_answer_says(repo, prefect_api):
    """retrain.approval: required. No answer in time: the run fails and nothing lands. Answer "keep": the
    images land, the champion stays, the answer is recorded. Answer "promote": the challenger becomes the champion
    with the reviewer in its record. Tolerances of 1.0 make every challenger eligible (else there is no question)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import approval
    from vqflow.model_store import champion

    params = yaml.safe_load((repo / "params.yaml").read_text())
    original = yaml.safe_dump(params)
    params["retrain"].update(approval="required", approval_timeout_hours=0.003)
    params["export"].update(tolerance_mean=1.0, tolerance_category=1.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-qam", "retrain: a person approves promotions")
    main_before = subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout
    champion_before = champion(repo / "registry/champions.json")["tag"]
    new = _new_normals(repo, 1, 950)
    thread, done, run, question = _paused_retrain(repo, prefect_api)
    thread.join()
    assert run is not None and "| mean mad |" in question and f"the champion {champion_before}" in question, question
    assert done["run"].returncode != 0 and "nobody answered within" in done["run"].output, done["run"].output[-3000:]
    assert subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout == main_before
    assert all(p.exists() for p in new) and _git_status(repo) == ""

    params["retrain"]["approval_timeout_hours"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "commit", "-qam", "retrain: half an hour to answer")
    answers = [("keep", "the wood heat maps look noisy"), ("promote", "checked the heat maps")]
    for index, (decision, note) in enumerate(answers):
        added_before = set(_added(repo))
        thread, done, run, question = _paused_retrain(repo, prefect_api)
        assert run is not None, "the run did not pause"
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            approval.answer(str(run.id), decision == "promote", "alice", note)
        thread.join()
        output = done["run"].output
        assert done["run"].returncode == 0, output[-3000:]
        record = json.loads((repo / "metrics/export.json").read_text())
        record_after = champion(repo / "registry/champions.json")
        if decision == "keep":
            assert record["role"] == "challenger" and record["eligible"], record
            assert f"not promoted: kept as challenger by alice: {note}" in record["reasons"], record
            assert record_after["tag"] == champion_before
        else:
            assert record["role"] == "champion" and record_after["tag"] == record["tag"] != champion_before
            assert record_after["reason"].startswith(f"approved by alice ({note}); "), record_after
        assert len(set(_added(repo)) - added_before) >= 1 and not any(p.exists() for p in new), "the images landed"
        assert _git_status(repo) == ""
        new = _new_normals(repo, 1, 960 + index)
    for path in new:
        path.unlink()
    (repo / "params.yaml").write_text(original)
    _git(repo, "commit", "-qam", "retrain: promotions without a person again")


def _git_status(repo) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()


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
    new = _new_normals(repo, 1, 600)
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
