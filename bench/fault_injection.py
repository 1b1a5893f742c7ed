"""kill -9 of the retrain flow at each point of flows/faults.py, each followed by a complete second run.

One scratch repository (the project's dvc.yaml, code and .dvc/config with autostage on; tiny params) gets a first
pipeline run for a champion; then, per kill point: two new normal images into the inbox, a retrain run whose
whole process group is SIGKILLed when it reaches the point, a second run that must succeed, and the checks of
flows/faults.check_invariants (no image lost or duplicated, data/added as main commits it, git status clean,
on main, the champion changed only by a completed run). Writes bench/results/fault_injection.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import quiet_offline_env, write_results  # noqa: E402
from flows.faults import KILL_POINTS, check_invariants, digest, new_normals, run_retrain, scratch_repo  # noqa: E402
from vqflow.io import read_json  # noqa: E402


def _champion(repo: Path) -> str:
    return read_json(repo / "registry/champions.json")[-1]["tag"]


def _champion_on_main(repo: Path) -> str:
    """The champion main commits (the workspace of a killed run may hold a transaction's uncommitted record)."""
    shown = subprocess.run(["git", "show", "main:registry/champions.json"], cwd=repo, capture_output=True, text=True)
    return json.loads(shown.stdout)[-1]["tag"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqflow-faults-"))
    os.environ.update(quiet_offline_env(work))
    repo = scratch_repo(Path(tempfile.mkdtemp(dir=work)))
    first = subprocess.run(
        [sys.executable, "-c", f"from flows.pipeline import pipeline; pipeline({str(repo)!r})"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "first run"], cwd=repo, check=True)
    rows = []
    for case, (name, marker, delay) in enumerate(KILL_POINTS):
        champion_before = _champion(repo)
        new = new_normals(repo / "data/inbox", 2, 1000 + 10 * case)
        images = {digest(p): p.name for p in new}
        killed = run_retrain(repo, marker, delay)
        if _champion_on_main(repo) != champion_before and name != "after landing":
            problems = ["the champion on main changed without a completed run"]
        else:
            problems = []
        second = run_retrain(repo)
        problems += check_invariants(repo, images, repo / "data/inbox", champion_before, promoted_by_completed_run=True)
        if name == "after landing" and "already committed by an interrupted run" not in second.output:
            problems.append("the second run did not recognise the landed images")
        left = sum(p.exists() for p in new)
        rows.append(
            {
                "kill point": name,
                "killed": killed.killed,
                "killed after s": round(killed.seconds, 1),
                "second run ok": second.returncode == 0 and "RESULT" in second.output,
                "second run s": round(second.seconds, 1),
                "images left in inbox": left,
                "problems": problems,
            }
        )
        print(rows[-1], flush=True)
    table = [
        "| kill -9 point | killed | after (s) | second run | second run (s) | images left in inbox | invariants |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['kill point']} | {'yes' if r['killed'] else 'NO'} | {r['killed after s']} | "
            f"{'succeeded' if r['second run ok'] else 'FAILED'} | {r['second run s']} | "
            f"{r['images left in inbox']} | {'hold' if not r['problems'] else '; '.join(r['problems'])} |"
        )
    path = write_results("fault_injection", {"cases": rows}, "\n".join(table))
    print(path.read_text())
    if any(r["problems"] or not r["second run ok"] or not r["killed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
