"""Fault injection for the retrain flow: run it as a process of its own, kill -9 its whole process group (the flow,
its ephemeral Prefect server if it has one, the stage it runs) when a line of its output says it reached a point,
and check what a crash must never do: lose, duplicate or half-commit an inbox image, or change the champion."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, a line the flow prints when it got there, seconds to wait before the kill)
KILL_POINTS = [
    ("after copy", "images to data/added", 0.0),
    ("after dvc add", "versioned data/added", 0.0),
    ("after the data commit", "committed the data as", 0.0),
    ("during train", "Running stage 'train'", 2.0),
    ("during evaluate", "Running stage 'evaluate'", 2.0),
    ("during export", "Running stage 'export'", 2.0),
    ("after landing", "landed: ", 0.0),
]


@dataclass
class FlowRun:
    killed: bool
    returncode: int
    output: str
    seconds: float


def run_retrain(
    repo: Path,
    kill_at: str | None = None,
    delay: float = 0.0,
    push: bool = False,
    timeout: float = 900.0,
    api_url: str | None = None,
) -> FlowRun:
    """`retrain(repo)` in a new session; with ``kill_at``, SIGKILL to the session when that text is printed.

    Without ``api_url`` the flow starts an ephemeral Prefect server inside the session (killed with it, as on a
    laptop); with it, the flow reports to that running server, which outlives the kill (as on a work pool)."""
    code = f"from flows.retrain import retrain; print('RESULT', retrain({str(repo)!r}, push={push!r}))"
    # a Prefect home of these runs' own: the caller's ephemeral server may hold its own database open
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_HOME": str(repo.parent / f"{repo.name}-prefect"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, killed = [], False
    for line in process.stdout:
        lines.append(line)
        if kill_at and kill_at in line:
            time.sleep(delay)
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
        if time.monotonic() - start > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError("".join(lines[-40:]))
    process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything the flow started that outlived it
    return FlowRun(killed, process.returncode, "".join(lines), time.monotonic() - start)


def scratch_repo(root: Path) -> Path:
    """A git + DVC repository in ``root`` with the project's dvc.yaml, code, .dvc/config (autostage on, the S3
    remote) and data sources, on tiny params; one commit on main."""
    import shutil

    import yaml

    from vqflow.testing import repo_params

    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "vqflow", root / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(repo_params()))
    (root / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "ci@example.com")
    _git(root, "config", "user.name", "ci")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    shutil.copy(ROOT / ".dvc/config", root / ".dvc/config")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "project")
    return root


def new_normals(inbox: Path, count: int, start: int, category: str = "wood") -> list[Path]:
    """``count`` new normal images of the tiny generated set in ``inbox/<category>/``."""
    from PIL import Image

    from vqflow.data.synthetic import render_sample

    (inbox / category).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = inbox / category / f"new_{i}.png"
        Image.fromarray(render_sample(category, "train", i, size=64)[0]).save(path)
        paths.append(path)
    return paths


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def committed_digests(repo: Path, rev: str = "main") -> list[str]:
    """sha256 of every image data/added holds at ``rev`` (read from DVC's cache, not the workspace)."""
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
        files = fs.find("data/added", detail=False) if fs.exists("data/added") else []
    except FileNotFoundError:
        return []
    return [hashlib.sha256(fs.read_bytes(f)).hexdigest() for f in files]


def check_invariants(
    repo: Path, images: dict[str, str], inbox: Path, champion_before: str, promoted_by_completed_run: bool
) -> list[str]:
    """What must hold after a kill and the next run's recovery; returns the violations (empty: all hold).
    ``images`` maps the sha256 of each image put into the inbox to its inbox file name."""
    problems = []
    in_inbox = {digest(p) for p in inbox.rglob("*.png")}
    committed = committed_digests(repo)
    for sha, name in images.items():
        count = committed.count(sha)
        if count > 1:
            problems.append(f"{name} is committed {count} times")
        if count == 0 and sha not in in_inbox:
            problems.append(f"{name} is lost: neither in the inbox nor committed in data/added")
    workspace = (
        sorted(digest(p) for p in (repo / "data/added").rglob("*") if p.is_file())
        if (repo / "data/added").is_dir()
        else []
    )
    if workspace != sorted(committed):
        problems.append("data/added in the workspace differs from what main commits")
    status = _git(repo, "status", "--porcelain")
    if status:
        problems.append(f"git status is not clean: {status}")
    if _git(repo, "rev-parse", "--abbrev-ref", "HEAD") != "main":
        problems.append("the checkout is not on main")
    record = json.loads((repo / "registry/champions.json").read_text())[-1]["tag"]
    if not promoted_by_completed_run and record != champion_before:
        problems.append(f"the champion changed to {record} without a completed run")
    return problems
