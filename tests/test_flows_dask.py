"""Feature extraction mapped over Dask equals the single-process cache: on a local cluster the flow starts, and on
a scheduler and 2 workers started as separate processes writing through S3 (moto on 127.0.0.1)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_params
from vqflow import stages
from vqflow.testing import free_port, moto_s3, s3_client, s3_env

pytestmark = pytest.mark.slow  # Dask scheduler and worker processes, moto S3

ROOT = Path(__file__).resolve().parents[1]


def _entries(root):
    return {path.name: path for path in (root / "objects").glob("*/*.safetensors")}


@pytest.fixture()
def single_process_cache(tmp_path):
    """A tiny project, its single-process feature cache read into memory, and the cache then deleted."""
    from safetensors.torch import load_file

    params = tiny_params(tmp_path)
    params["features"].update(images_per_task=6, batch_size=6)  # tasks made of whole batches: the same kernels
    stages.run("generate", params)
    stages.run("prepare", params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.set_num_threads(1)  # the same threads as each Dask worker
    single, _ = stages.run("features", params)
    cache = tmp_path / "data/features"
    reference = {name: load_file(str(path)) for name, path in _entries(cache).items()}
    (cache / "index.json").unlink()
    for path in _entries(cache).values():
        path.unlink()
    return tmp_path, single, reference


def _assert_same_cache(cache: Path, index: dict, single: dict, reference: dict) -> None:
    from safetensors.torch import load_file

    assert index == single and len(reference) >= 24
    assert set(_entries(cache)) == set(reference)
    for name, tensors in reference.items():
        other = load_file(str(_entries(cache)[name]))
        for key, value in tensors.items():
            torch.testing.assert_close(other[key], value, atol=1e-6, rtol=0)
    assert json.loads((cache / "index.json").read_text())["key"] == single["key"]


def test_dask_tasks_index_into_the_same_cache_and_dvc_records_it(single_process_cache):
    from flows.features import features_on_dask

    project, single, reference = single_process_cache
    stage = {"cmd": "vqflow features", "deps": ["data/manifest.csv"], "outs": [{"data/features": {"persist": True}}]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"features": stage}}))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    status = subprocess.run(["dvc", "status", "features"], cwd=project, capture_output=True, text=True, check=True)
    assert "changed" in status.stdout or "new" in status.stdout  # not recorded yet
    index = features_on_dask(str(project), record=True)
    _assert_same_cache(project / "data/features", index, single, reference)
    status = subprocess.run(["dvc", "status", "features"], cwd=project, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout  # `dvc repro` would not extract again


@contextlib.contextmanager
def dask_cluster(env: dict, cwd: Path):
    """`dask scheduler` and two `dask worker` processes (1 thread each) on 127.0.0.1; yields the address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    procs = [
        subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        time.sleep(2)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [*dask, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard"],
                    env=env,
                    cwd=cwd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_separate_dask_processes_extract_through_s3(single_process_cache, monkeypatch):
    from flows.features import features_on_dask

    project, single, reference = single_process_cache
    with moto_s3() as endpoint:
        s3_client(endpoint).create_bucket(Bucket="features")
        env = {**s3_env(endpoint), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.setenv(key, env[key])
        with dask_cluster(env, ROOT) as address:
            index = features_on_dask(str(project), address=address, storage="s3://features/run1")
        stored = s3_client(endpoint).list_objects_v2(Bucket="features", Prefix="run1/objects/")
        assert stored["KeyCount"] == len(reference)  # the workers wrote every entry to S3
    _assert_same_cache(project / "data/features", index, single, reference)
