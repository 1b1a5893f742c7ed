"""DVC push/pull through the project's S3 remote, against a real S3-compatible server on 127.0.0.1."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vqflow.testing import moto_s3, s3_client, s3_env

pytestmark = pytest.mark.slow  # dvc push / pull through moto S3

DVC = str(Path(sys.executable).parent / "dvc")


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_delete_pull_round_trip(tmp_path, tiny_dataset):
    repo = tmp_path / "repo"
    repo.mkdir()
    with moto_s3() as endpoint:
        env = s3_env(endpoint)
        s3_client(endpoint).create_bucket(Bucket="vqflow-dvc")
        _run(["git", "init", "-q"], repo, env)
        _run([DVC, "init", "-q"], repo, env)
        shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's remote definition
        shutil.copytree(tiny_dataset, repo / "data" / "synthetic")
        _run([DVC, "add", "data/synthetic"], repo, env)
        before = _digests(repo / "data" / "synthetic")
        out = _run([DVC, "push"], repo, env)
        assert "pushed" in out
        bucket_keys = s3_client(endpoint).list_objects_v2(Bucket="vqflow-dvc")
        assert bucket_keys["KeyCount"] >= len(before)
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(repo / "data" / "synthetic")
        _run([DVC, "pull"], repo, env)
        assert _digests(repo / "data" / "synthetic") == before
