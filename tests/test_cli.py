import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from tests.conftest import ROOT
from vqflow.testing import tiny_params
from vqflow.train import cpu_has_bfloat16


def _vqflow(tmp_path: Path, params: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, "-m", "vqflow.cli", *args], cwd=tmp_path, capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_stage_pipeline_on_a_tiny_dataset(tmp_path):
    params = tiny_params(Path("."))  # paths relative to the project folder, as in params.yaml
    params["generate"].update(categories=["wood"], train_per_category=4, test_good_per_category=1)
    params["train"].update(batch_size=2, init_images=4)
    for stage in ("generate", "prepare", "features", "train", "calibrate", "package", "evaluate", "summary"):
        result = _vqflow(tmp_path, params, stage)
        assert result.returncode == 0, result.stderr
    assert "wood" in result.stdout and "Feature cache: 9 images" in result.stdout
    assert "Model: vqflow trained on 3 images" in result.stdout
    metrics = json.loads((tmp_path / "metrics/metrics.json").read_text())
    assert set(metrics["per_category"]) == {"wood"}
    assert [row["epoch"] for row in json.loads((tmp_path / "metrics/train_log.json").read_text())] == [1, 2]
    scores = (tmp_path / "metrics/scores.csv").read_text().splitlines()
    assert scores[0].startswith("image_id,category,label,defect_type,score,") and len(scores) == 1 + 5
    table = pd.read_csv(tmp_path / "metrics/scores.csv")
    assert metrics["mean"]["image_auroc"] == pytest.approx(roc_auc_score(table.label, table.score), abs=1e-9)
    roc = pd.read_csv(tmp_path / "metrics/curves/roc/wood.csv")  # the data `dvc plots diff` draws
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(metrics["mean"]["image_auroc"], abs=1e-5)
    histogram = sum(
        pd.read_csv(tmp_path / f"metrics/curves/histogram/wood_{k}.csv")["count"].sum() for k in ("normal", "defective")
    )
    assert histogram == len(table)
    assert sorted(p.name for p in (tmp_path / "models/model").iterdir()) == [
        "backbone.safetensors",
        "config.json",
        "model.safetensors",
        "thresholds.json",
    ]
    thresholds = json.loads((tmp_path / "models/model/thresholds.json").read_text())
    assert thresholds["categories"]["wood"]["val_images"] == 1
    assert set(metrics["at_threshold"]["wood"]) >= {"threshold", "precision", "recall", "f1", "oracle_f1max"}
    timing = json.loads((tmp_path / "metrics/timing.json").read_text())
    assert timing["evaluate"]["fps"] > 0 and len(timing["train"]["seconds_per_epoch"]) == 2
    assert "fps" not in metrics and "seconds" not in (tmp_path / "models/model/config.json").read_text()
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["gallery_wood.png", "metrics_per_category.png", "pr.png", "roc.png", "score_histograms.png"]
    report = (tmp_path / "reports/report.md").read_text()
    assert "| **mean** |" in report and "![gallery_wood](../plots/gallery_wood.png)" in report

    # the same inputs give the same bytes (what makes dvc.lock a record of the code): train from scratch again
    outputs = [
        "models/model",
        "metrics/metrics.json",
        "metrics/train_log.json",
        "metrics/scores.csv",
        "plots",
        "metrics/curves",
        "reports/report.md",
    ]
    first = _digests(tmp_path, outputs)
    shutil.rmtree(tmp_path / "data/checkpoints")
    for stage in ("train", "calibrate", "package", "evaluate"):
        assert _vqflow(tmp_path, params, stage).returncode == 0
    assert json.loads((tmp_path / "metrics/timing.json").read_text())["train"] != timing["train"], "trained again"
    assert _digests(tmp_path, outputs) == first


def _digests(root, outputs) -> dict[str, str]:
    import hashlib

    files = [f for o in outputs for f in ([root / o] if (root / o).is_file() else sorted((root / o).rglob("*")))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_bad_params_exit_non_zero_naming_the_field(tmp_path):
    result = _vqflow(tmp_path, {"prepare": {"sources": []}}, "prepare")
    assert result.returncode == 2
    assert "prepare.manifest" in result.stderr
    result = _vqflow(
        tmp_path, {"prepare": {"sources": [{"kind": "mvtec", "root": "nowhere"}], "manifest": "m.csv"}}, "prepare"
    )
    assert result.returncode == 2 and "nowhere: dataset root does not exist" in result.stderr
    assert not (tmp_path / "m.csv").exists()


def test_repository_holds_no_image_data():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    data_suffixes = (
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".tif",
        ".tiff",
        ".zip",
        ".npy",
        ".npz",
        ".safetensors",
        ".pt",
        ".pth",
    )
    offenders = [f for f in listed.stdout.splitlines() if f.lower().endswith(data_suffixes)]
    assert offenders == []


def test_predict_cli_prints_decisions_and_writes_overlays(trained_project, tmp_path):
    import pandas as pd
    import yaml

    root, params = trained_project
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    offline = pd.read_csv(params["outputs"]["scores"], dtype={"image_id": str}).set_index("image_id")
    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    row = manifest[(manifest.split == "test") & (manifest.label == 1)].iloc[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vqflow.cli",
            "predict",
            row.path,
            "--category",
            row.category,
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    score = float(result.stdout.split("score=")[1].split()[0])
    expected = offline.loc[row.image_id, "score"]
    # float32 noise: the raw image through the backbone (the CLI pins AVX2 kernels) vs cached features (this process's
    # kernels; AVX-512 here), divided by each position's training std: 1.4e-6 relative seen on an AVX-512 machine
    assert abs(score - expected) <= 1e-5 * max(1.0, abs(expected))
    assert ("ANOMALOUS" in result.stdout) == (score > float(result.stdout.split("threshold=")[1].split()[0]))
    assert (tmp_path / "out" / Path(row.path).parent.name / f"{Path(row.path).stem}_overlay.png").is_file()
    failed = subprocess.run(
        [sys.executable, "-m", "vqflow.cli", "predict", str(bad)], cwd=tmp_path, capture_output=True, text=True
    )
    assert failed.returncode == 2 and "broken.png" in failed.stderr


def test_overlays_of_same_named_inputs_never_collide(trained_project, tmp_path):
    import yaml

    _, params = trained_project
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    source = Path(params["generate"]["root"])
    first = next((source / "chip/test/good").glob("*.png"))
    inputs = []
    for line in ("line_a", "line_b"):  # two stations' images of the same name
        target = tmp_path / line / "test/good" / first.name
        target.parent.mkdir(parents=True)
        target.write_bytes(
            first.read_bytes() if line == "line_a" else next((source / "wood/test/good").glob("*.png")).read_bytes()
        )
        inputs.append(str(target.relative_to(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "vqflow.cli", "predict", *inputs, "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    written = {line.split(" -> ")[1] for line in result.stdout.splitlines() if " -> " in line}
    expected = {f"out/{line}/test/good/{first.stem}_overlay.png" for line in ("line_a", "line_b")}
    assert written == expected and all((tmp_path / w).is_file() for w in expected)
    images = [Image.open(tmp_path / w).tobytes() for w in sorted(expected)]
    assert images[0] != images[1]  # each input has its own overlay


CPU_INFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(
    not CPU_INFO.exists() or "avx2" not in CPU_INFO.read_text(), reason="the kernel pin is for x86-64 with AVX2"
)
@pytest.mark.parametrize("user_value, expected", [(None, "AVX2"), ("default", "DEFAULT")])
def test_the_command_pins_torch_kernels_unless_the_user_chose(user_value, expected):
    from vqflow.cli import REPRODUCIBLE_KERNELS

    env = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_KERNELS}
    if user_value:
        env["ATEN_CPU_CAPABILITY"] = user_value
    code = (
        "from vqflow.cli import pin_cpu_kernels as p; p(); import torch; print(torch.backends.cpu.get_cpu_capability())"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split()[-1] == expected, run.stdout + run.stderr


@pytest.mark.skipif(
    not CPU_INFO.exists() or "avx2" not in CPU_INFO.read_text() or not cpu_has_bfloat16(),
    reason="needs an x86-64 CPU with bfloat16 kernels",
)
def test_bfloat16_training_is_not_pinned_and_refused_where_it_would_crawl(trained_project, tmp_path):
    from vqflow.cli import EXIT_BAD_INPUT, REPRODUCIBLE_KERNELS

    _, params = trained_project
    params = copy.deepcopy(params)
    params["train"].update(per_model={"vqflow": {"precision": "bfloat16"}})
    model = tmp_path / "weights"
    params["outputs"].update(
        weights=str(model), checkpoints=str(tmp_path / "checkpoints"), train_log=str(tmp_path / "train_log.json")
    )
    unpinned = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_KERNELS}
    trained = _vqflow(tmp_path, params, "train", env=unpinned)
    assert trained.returncode == 0, trained.stderr  # the command did not pin the train stage to AVX2
    weights = (model / "model.safetensors").read_bytes()

    # a user who pins the kernels gets a clear refusal (a step would be ~10x slower), and the model stays
    shutil.rmtree(tmp_path / "checkpoints")
    refused = _vqflow(tmp_path, params, "train", env={**unpinned, **REPRODUCIBLE_KERNELS})
    assert refused.returncode == EXIT_BAD_INPUT
    assert "train.precision: bfloat16 needs bfloat16 CPU kernels" in refused.stderr and "AVX2" in refused.stderr
    assert (model / "model.safetensors").read_bytes() == weights


def test_the_train_stage_never_resumes_a_checkpoint_of_other_code(trained_project, tmp_path):
    """The train stage keys its checkpoint by its own code: the same command run by edited training code (a copy of
    the library on PYTHONPATH) trains anew beside the old checkpoint instead of returning the old code's model."""
    _, params = trained_project
    params = copy.deepcopy(params)
    checkpoints = tmp_path / "checkpoints"
    params["outputs"].update(
        weights=str(tmp_path / "weights"), checkpoints=str(checkpoints), train_log=str(tmp_path / "train_log.json")
    )
    library = tmp_path / "library"
    shutil.copytree(ROOT / "vqflow", library / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(library)}

    def train() -> list[str]:
        result = _vqflow(tmp_path, params, "train", env=env)
        assert result.returncode == 0, result.stderr
        return sorted(p.name for p in checkpoints.iterdir())

    first = train()
    assert len(first) == 1 and train() == first  # the same code finds its finished checkpoint
    flows = library / "vqflow/models/flows.py"
    flows.write_text(flows.read_text() + "\n# an edit of the library\n")
    second = train()
    assert len(second) == 2 and set(first) < set(second)
