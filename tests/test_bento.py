"""The bento carries its model: export -> promote -> `bentoml build` -> `bentoml export` (file and S3) -> import into
an EMPTY BentoML home elsewhere -> `bentoml serve <bento>`: the same scores as `vqflow predict`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from tests.conftest import ROOT
from vqflow.testing import bentoml_server, moto_s3, s3_client, s3_env

pytestmark = pytest.mark.slow  # bentoml build / export / serve processes

BIN = Path(sys.executable).parent
PIPELINE_TOOLS = ("dvc", "prefect", "great-expectations", "great_expectations", "moto", "pytest")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_serving_requirements_are_pinned_like_the_project_and_hold_no_pipeline_tools():
    serve, constraints = _pins(ROOT / "requirements/serve.txt"), _pins(ROOT / "requirements/constraints.txt")
    assert {"bentoml", "torch", "timm", "freia", "safetensors", "pillow", "numpy"} <= set(serve)
    for name, version in serve.items():
        assert constraints.get(name) == version, (
            f"{name}=={version} differs from constraints.txt ({constraints.get(name)})"
        )
    assert not set(serve) & set(PIPELINE_TOOLS)
    assert (
        yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["requirements_txt"] == "requirements/serve.txt"
    )


def _run(command, cwd, env) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        s3_client(endpoint).create_bucket(Bucket="vqflow-models")
        yield endpoint


@pytest.fixture(scope="module")
def built(trained_project, tmp_path_factory, s3):
    """A project directory as a user has it (code, bentofile, params, champion record) with a built bento."""
    _, params = trained_project
    project = tmp_path_factory.mktemp("bento_project")
    shutil.copytree(ROOT / "vqflow", project / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "bentofile.yaml", project / "bentofile.yaml")
    (project / "requirements").mkdir()
    shutil.copy(ROOT / "requirements/serve.txt", project / "requirements/serve.txt")
    params = {
        **params,
        "outputs": {
            **params["outputs"],
            "champions": "registry/champions.json",
            "export": str(project / "export.json"),
        },
        "export": {**params["export"], "publish": "s3://vqflow-models/champions/"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for clutter in ("data/synthetic/x.png", "models/model/m.bin", ".dvc/cache/ab", ".venv-peer/lib/x.py"):
        (project / clutter).parent.mkdir(parents=True, exist_ok=True)  # what a user's checkout holds beside the code
        (project / clutter).write_bytes(b"not for the bento")
    env = {
        **s3_env(s3),
        "BENTOML_HOME": str(project / ".home/bentoml"),  # inside the project, as the Makefile has it
        "BENTOML_DO_NOT_TRACK": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    exported = _run([BIN / "vqflow", "export"], project, env)
    tag = json.loads((project / "export.json").read_text())["tag"]
    assert "challenger" in exported and "not a git repository" in exported  # no committed run: no promotion
    assert not (project / "registry/champions.json").exists()
    _run([BIN / "vqflow", "promote", tag], project, env)
    assert json.loads((project / "registry/champions.json").read_text())[-1]["tag"] == tag
    again = _run([BIN / "vqflow", "export"], project, env)
    assert "already the champion" in again  # the same model exported again: the same content tag, nothing new
    # after a retrain a user builds again into the same home: BentoML's temporary build folder and the first bento
    # are inside the project then; with an inbox configured and no token (that is the serving machine's)
    for _ in range(2):
        _run([BIN / "bentoml", "build"], project, {**env, "VQFLOW_INBOX": str(project / "inbox")})
    return project, params, env, tag


def test_a_second_build_into_a_home_inside_the_project_packs_only_what_bentofile_names(built):
    project, _, env, _ = built
    bentos = Path(env["BENTOML_HOME"]) / "bentos/vqflow-anomaly-service"
    versions = sorted((p for p in bentos.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert len(versions) == 2
    source = versions[-1] / "src"
    packed = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    assert packed and all(
        p.startswith("vqflow/")
        and p.endswith(".py")
        or p in ("params.yaml", "registry/champions.json", "bentofile.yaml")
        for p in packed
    ), packed
    assert not [p for p in source.iterdir() if p.is_dir() and p.name in (".home", "data", "models", ".dvc", ".venv")]
    project_code = sorted(str(p.relative_to(project)) for p in (project / "vqflow").rglob("*.py"))
    assert [p for p in packed if p.startswith("vqflow/")] == project_code, "the bento lacks code it imports"


def test_bento_lists_the_champion_and_only_serving_requirements(built):
    _, _, env, tag = built
    bento = Path(env["BENTOML_HOME"]) / "bentos/vqflow-anomaly-service"
    version = (bento / "latest").read_text().strip()
    info = yaml.safe_load((bento / version / "bento.yaml").read_text())
    listed = [m["tag"] for s in info["services"] for m in s["models"]] + [m["tag"] for m in info.get("models") or []]
    assert tag in listed
    requirements = (bento / version / "env/python/requirements.txt").read_text().lower()
    for tool in PIPELINE_TOOLS:
        assert not re.search(rf"^{re.escape(tool)}\b", requirements, re.M), f"{tool} in the bento's requirements"


def _offline_scores(project: Path, params: dict, paths: list[str], env: dict) -> dict[str, float]:
    out = _run(
        [
            BIN / "vqflow",
            "predict",
            *paths,
            "--model",
            params["outputs"]["model"],
            "--out",
            str(project / "predictions"),
        ],
        project,
        env,
    )
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+): score=(\S+)", out, re.M)}


def _serve_and_compare(bento_source: str, built, tmp_path: Path, paths: list[str]) -> None:
    project, params, env, tag = built
    fresh = {**env, "BENTOML_HOME": str(tmp_path / "empty_home")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([BIN / "bentoml", "import", bento_source], elsewhere, fresh)
    expected = _offline_scores(project, params, paths, env)
    fresh.pop("VQFLOW_MODEL_TAG", None)
    with bentoml_server(fresh, target="vqflow-anomaly-service:latest", cwd=elsewhere) as (url, _):
        for path in paths:
            response = requests.post(
                f"{url}/predict", files={"image": (Path(path).name, Path(path).read_bytes(), "image/png")}, timeout=60
            )
            assert response.status_code == 200, response.text
            assert response.json()["model_tag"] == tag
            assert abs(response.json()["score"] - expected[path]) < 1e-5, (path, response.json(), expected[path])


def _test_images(params: dict, count: int | None = None) -> list[str]:
    manifest = pd.read_csv(params["prepare"]["manifest"], keep_default_na=False)
    return manifest[manifest.split == "test"].path.tolist()[:count]


def test_bento_file_served_from_an_empty_home_scores_like_vqflow_predict(built, tmp_path):
    project, params, env, _ = built
    _run([BIN / "bentoml", "export", "vqflow-anomaly-service:latest", str(tmp_path / "service.bento")], project, env)
    _serve_and_compare(str(tmp_path / "service.bento"), built, tmp_path, _test_images(params))


def test_bento_from_s3_and_published_champion_model(built, tmp_path, s3):
    project, params, env, tag = built
    _run(
        [BIN / "bentoml", "export", "vqflow-anomaly-service:latest", "s3://vqflow-models/bentos/service.bento"],
        project,
        env,
    )
    _serve_and_compare("s3://vqflow-models/bentos/service.bento", built, tmp_path, _test_images(params, 4))
    # the promotion published the model itself: a serving machine can import it from S3 into its store
    name, version = tag.split(":")
    home = {**env, "BENTOML_HOME": str(tmp_path / "model_home")}
    _run(
        [BIN / "bentoml", "models", "import", f"s3://vqflow-models/champions/{name}-{version}.bentomodel"],
        tmp_path,
        home,
    )
    stored = yaml.safe_load(_run([BIN / "bentoml", "models", "get", tag], tmp_path, home))
    assert (stored["name"], stored["version"]) == (name, version)
