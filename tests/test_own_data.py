"""README's "Your own data", as a user follows it in a fresh clone: prepare.sources pointed at another MVTec-layout
set, commit, `dvc repro` on main. The clone's committed champion record names the synthetic model; the user's first
model starts its own champion line, and `bentoml serve` answers with it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from flows.faults import scratch_repo
from tests.conftest import ROOT
from vqflow.data.synthetic import generate
from vqflow.testing import bentoml_server

pytestmark = pytest.mark.slow  # a fresh repository reproduced with dvc and served by bentoml

BIN = Path(sys.executable).parent


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_first_model_of_a_users_own_data_becomes_its_champion_and_is_served(tmp_path):
    own = generate(tmp_path / "line_images", ["washer", "fabric"], 8, 2, 1, 64, 5, progress=False)
    for generated, ours in (("washer", "bolt"), ("fabric", "gear")):  # the line's own parts
        (own / generated).rename(own / ours)
    repo = tmp_path / "clone"
    repo.mkdir()
    scratch_repo(repo)
    (repo / "registry").mkdir()
    shutil.copy(ROOT / "registry/champions.json", repo / "registry/champions.json")  # as a fresh clone has it
    shutil.copy(ROOT / "bentofile.yaml", repo / "bentofile.yaml")
    synthetic_champion = json.loads((repo / "registry/champions.json").read_text())[-1]["tag"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["sources"] = [{"kind": "mvtec", "root": str(own), "categories": []}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "GIT_AUTHOR_NAME": "user",
        "GIT_AUTHOR_EMAIL": "user@example.com",
        "GIT_COMMITTER_NAME": "user",
        "GIT_COMMITTER_EMAIL": "user@example.com",
    }
    env.pop("DVC_EXP_NAME", None)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "our line's images"], repo, env)
    _run([str(BIN / "dvc"), "repro", "--quiet"], repo, env)

    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["role"] == "champion", export["reasons"]
    assert "first model of its data set" in export["reasons"][0] and synthetic_champion in export["reasons"][0]
    record = json.loads((repo / "registry/champions.json").read_text())
    assert record[-1]["tag"] == export["tag"] and record[-1]["metrics"]["dataset"]["categories"] == ["bolt", "gear"]

    image = next((own / "gear/test/good").iterdir())
    with bentoml_server(env, cwd=repo) as (url, _):
        answer = requests.post(
            f"{url}/predict", files={"image": (image.name, image.read_bytes(), "image/png")}, data={"category": "gear"}
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_tag"] == export["tag"]
