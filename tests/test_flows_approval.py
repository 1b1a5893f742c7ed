"""retrain.approval: required, on a tiny generated dataset in a temporary git + DVC repo (a Prefect server on
127.0.0.1): a run pauses for a person's answer."""

import json
import subprocess

import pytest
import yaml

from tests.conftest import _inbox_normals, _added, _git, _git_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(trained_repo):
    return trained_repo


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
    new = _inbox_normals(repo, 1, 950)
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
        new = _inbox_normals(repo, 1, 960 + index)
    for path in new:
        path.unlink()
    (repo / "params.yaml").write_text(original)
    _git(repo, "commit", "-qam", "retrain: promotions without a person again")
