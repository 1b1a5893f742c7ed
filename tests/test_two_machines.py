"""The retrain deployment on a worker of its own, all on 127.0.0.1: a bare git repository as the remote, moto as
the S3 DVC remote and model store, a Prefect server, and a process worker whose flow run clones into its own empty
directory (prefect.yaml's pull steps), retrains, pushes; a second clone then sees what the worker made."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, prefect_server
from vqflow.testing import moto_s3, repo_params, s3_client, s3_env

pytestmark = pytest.mark.slow  # a bare git remote, moto S3 and a Prefect process worker

BIN = Path(sys.executable).parent


def _run(args, cwd, env, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _developer_repo(path: Path, origin: Path, env: dict) -> None:
    """The project as a developer pushes it: code, params, prefect.yaml, generated data on the DVC remote."""
    path.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in deployments["deployments"]:
        deployment.pop("schedules", None)  # the hourly cron must not race the run this test starts
    (path / "prefect.yaml").write_text(yaml.safe_dump(deployments, sort_keys=False))
    shutil.copytree(ROOT / "vqflow", path / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "flows", path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    params = repo_params()
    params["export"]["publish"] = "s3://vqflow-models/champions/"
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q", "-b", "main"], path, env)
    _run([str(BIN / "dvc"), "init", "-q"], path, env)
    shutil.copy(ROOT / ".dvc/config", path / ".dvc/config")  # the project's S3 remote, autostage on
    _run([str(BIN / "dvc"), "repro", "--quiet", "prepare"], path, env)  # the dataset the inbox is checked against
    _run([str(BIN / "dvc"), "push", "--quiet"], path, env)
    _run(["git", "add", "-A"], path, env)
    _run(["git", "commit", "-q", "-m", "project"], path, env)
    _run(["git", "remote", "add", "origin", str(origin)], path, env)
    _run(["git", "push", "-q", "-u", "origin", "main"], path, env)


def test_a_worker_clones_retrains_and_pushes_and_a_second_clone_sees_it(tmp_path):
    origin, inbox, pool_dir = tmp_path / "origin.git", tmp_path / "inbox", tmp_path / "worker"
    pool_dir.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    with moto_s3() as endpoint:
        s3 = s3_client(endpoint)
        for bucket in ("vqflow-dvc", "vqflow-models"):
            s3.create_bucket(Bucket=bucket)
        env = {
            **s3_env(endpoint),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "VQFLOW_GIT_URL": f"file://{origin}",
            "VQFLOW_INBOX": str(inbox),
            "BENTOML_HOME": str(tmp_path / "bentoml"),
            "GIT_AUTHOR_NAME": "dev",
            "GIT_AUTHOR_EMAIL": "dev@example.com",
            "GIT_COMMITTER_NAME": "dev",
            "GIT_COMMITTER_EMAIL": "dev@example.com",
        }
        _developer_repo(tmp_path / "dev", origin, env)
        from vqflow.data.synthetic import render_sample

        (inbox / "wood").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(render_sample("wood", "train", 800 + i, size=64)[0]).save(inbox / "wood" / f"line_{i}.png")

        with prefect_server(env) as api_url:
            env["PREFECT_API_URL"] = api_url
            _run([str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"], tmp_path, env)
            _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "retrain"], tmp_path / "dev", env)
            # the worker machine: no checkout, no git identity, only the environment the README lists
            worker_env = {k: v for k, v in env.items() if not k.startswith("GIT_")}
            worker_log = open(tmp_path / "worker.log", "w")
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"],
                cwd=pool_dir,
                env=worker_env,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            try:
                run = subprocess.run(
                    [
                        str(BIN / "prefect"),
                        "deployment",
                        "run",
                        "vqflow-retrain/retrain",
                        "--watch",
                        "--watch-timeout",
                        "900",
                    ],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                )
            finally:
                worker.terminate()
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:  # a worker slow to shut down is not what this test is about
                    worker.kill()
                    worker.wait(timeout=60)
            log = (tmp_path / "worker.log").read_text()
            assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-2000:] + log[-6000:]

        assert not list(inbox.rglob("*.png")), "the images left the inbox after the push"
        assert list(pool_dir.iterdir()) == [], "the worker's run worked in a directory of its own"
        second = tmp_path / "second"
        _run(["git", "clone", "-q", str(origin), str(second)], tmp_path, env)
        log = _run(["git", "log", "--format=%s"], second, env)
        assert "retrain: add 3 validated normal images" in log, log
        _run([str(BIN / "dvc"), "pull", "--quiet"], second, env)
        status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], second, env))
        assert status == {"export": ["always changed"]}, f"the second clone's outputs match dvc.lock: {status}"
        manifest = (second / "data/manifest.csv").read_text()
        added = sorted((second / "data/added/wood").iterdir())
        assert len(added) == 3 and all(p.name in manifest for p in added)
        record = json.loads((second / "registry/champions.json").read_text())[-1]
        published = s3.list_objects_v2(Bucket="vqflow-models").get("Contents", [])
        assert any(record["tag"].split(":")[1] in item["Key"] for item in published), published
