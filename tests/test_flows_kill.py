"""kill -9 of a retrain run on a tiny generated dataset in a temporary git + DVC repo (a Prefect server on 127.0.0.1)."""

import json
import subprocess

import pytest

from tests.conftest import _inbox_normals, _manifest_rows

pytestmark = pytest.mark.slow

# the last point before each recovery path's boundary: data versioned, not committed (recover restores the
# workspace); committed, a stage running (recover reverts the data commit); landed (nothing to undo)
ONE_PER_RECOVERY_PATH = ("after dvc add", "during export", "after landing")


@pytest.fixture(scope="module")
def repo(trained_repo):
    return trained_repo


def test_retrain_quarantines_versions_promotes_and_survives_a_kill_9(repo, prefect_api):
    """Two new normal images and a corrupt one. kill -9 of the flow's process group at one point of each recovery
    path of a retrain (data versioned but not committed; committed, the stages running; landed on main), each next
    run getting one point further after the recovery every run starts with, then a run that finds the landed
    images still in the inbox: nothing is lost, duplicated or half-committed, the corrupt image is quarantined with
    its reason, the model is promoted only if not worse. All seven kill points, each followed by a full second
    run: bench/fault_injection.py (bench/results/fault_injection.md)."""
    from flows.retrain import recover
    from flows.faults import KILL_POINTS, check_invariants, committed_digests, digest, run_retrain

    champion_before = json.loads((repo / "registry/champions.json").read_text())[-1]["tag"]
    main_before = subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout
    rows_before = _manifest_rows(repo)
    new = _inbox_normals(repo, 2, 700)
    images = {digest(p): p.name for p in new}
    (repo / "data/inbox/wood/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name, marker, delay in [point for point in KILL_POINTS if point[0] in ONE_PER_RECOVERY_PATH]:
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
