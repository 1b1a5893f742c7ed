"""Shared fixtures: small generated datasets, the shared real data folder, quiet offline tools."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vqflow.testing import free_port, tiny_params, wait_http  # noqa: F401  (tests import tiny_params from here too)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VQFLOW_SHARED", ROOT.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"

for key, value in {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    # Prefect's ephemeral server logs its shutdown at exit, after pytest closed the streams: keep it quiet.
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(key, value)

# `make test` runs the files on two pytest-xdist workers: each gets tool homes of its own (two ephemeral Prefect
# servers on one SQLite database lock each other out) and one compute thread per process, itself and what it
# starts (two workers with a thread per core each would oversubscribe the cores).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    for home in ("PREFECT_HOME", "BENTOML_HOME"):
        if home in os.environ:
            os.environ[home] = str(Path(os.environ[home]) / WORKER)
            # Prefect creates its home without parents; the likely cause of a fresh-clone CI failure was that whether
            # .home/prefect existed yet depended on which test file a worker happened to run first
            Path(os.environ[home]).mkdir(parents=True, exist_ok=True)
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[threads] = "1"


@contextlib.contextmanager
def prefect_server(env: dict) -> Iterator[str]:
    """`prefect server start` on a free 127.0.0.1 port with ``env``; yields its API URL and stops it afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.terminate()
        server.wait(timeout=60)


def needs_shared(*parts: str):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(
        not path.exists(), reason=f"real data not available: {path} is absent (../shared is not beside the repo)"
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout tree: 2 categories, 64 px."""
    from vqflow.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny") / "synthetic"
    return generate(
        root,
        ["fabric", "chip"],
        train_per_category=6,
        test_good_per_category=2,
        test_per_defect=1,
        size=64,
        seed=3,
        progress=False,
    )


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A tiny project run through generate -> evaluate; returns (root, params)."""
    from vqflow import stages

    root = tmp_path_factory.mktemp("project")
    params = tiny_params(root)
    params["package"] = {"onnx": True}  # the served bundle carries model.onnx (serve.runtime: onnx)
    stages.run_all(params, ("generate", "prepare", "validate", "features", "train", "calibrate", "package", "evaluate"))
    return root, params


# --- the Prefect flow tests (test_flows*.py): a scratch git + DVC repository each, on tiny params ---


def flow_repo(tmp_path_factory) -> Path:
    """A scratch git + DVC repository of the project (flows/faults.py), with this process's tool homes beside it."""
    from flows.faults import scratch_repo

    root = tmp_path_factory.mktemp("flowrepo")
    home = tmp_path_factory.mktemp("homes")
    os.environ.update(
        {
            "BENTOML_HOME": str(home / "bentoml"),
            "PREFECT_HOME": str(home / "prefect"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
    )
    return scratch_repo(root)


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory) -> Path:
    """``flow_repo`` after a first pipeline run, committed: a champion the retrain runs compare with."""
    from flows.pipeline import pipeline

    repo = flow_repo(tmp_path_factory)
    pipeline(str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first run")
    return repo


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server for the flow runs a module starts as processes of their own: each would otherwise start
    (and lose to kill -9) an ephemeral server of its own, ~10 s a run; bench/fault_injection.py kills runs with
    their ephemeral server."""
    with prefect_server({**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server"))}) as url:
        yield url


def _inbox_normals(repo, count, start):
    """``count`` new normal wood images in the repository's retrain inbox (data/inbox)."""
    from flows.faults import new_normals

    return new_normals(repo / "data/inbox", count, start)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _git_status(repo) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()


def _added(repo) -> list[str]:
    folder = repo / "data/added/wood"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _manifest_rows(repo):
    return len((repo / "data/manifest.csv").read_text().splitlines()) - 1
