import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT


def _vqflow(tmp_path: Path, params: dict, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "vqflow.cli", *args], cwd=tmp_path, capture_output=True, text=True)


def test_stage_pipeline_on_a_tiny_dataset(tmp_path):
    params = {
        "generate": {"root": "data/synthetic", "categories": ["wood"], "train_per_category": 4,
                     "test_good_per_category": 1, "test_per_defect": 1, "size": 64, "seed": 0},
        "prepare": {"sources": [{"kind": "mvtec", "root": "data/synthetic"}], "val_fraction": 0.25, "seed": 0,
                    "manifest": "data/manifest.csv"},
        "features": {"backbone": "tf_efficientnet_lite0", "weights": "packaged", "image_size": 64,
                     "cache": "data/features", "shard_size": 4},
    }
    for stage in ("generate", "prepare", "features", "summary"):
        result = _vqflow(tmp_path, params, stage)
        assert result.returncode == 0, result.stderr
    assert "wood" in result.stdout and "Feature cache: 9 images" in result.stdout


def test_bad_params_exit_non_zero_naming_the_field(tmp_path):
    result = _vqflow(tmp_path, {"prepare": {"sources": []}}, "prepare")
    assert result.returncode == 2
    assert "prepare.manifest" in result.stderr
    result = _vqflow(tmp_path, {"prepare": {"sources": [{"kind": "mvtec", "root": "nowhere"}],
                                            "manifest": "m.csv"}}, "prepare")
    assert result.returncode == 2 and "nowhere: dataset root does not exist" in result.stderr
    assert not (tmp_path / "m.csv").exists()


def test_repository_holds_no_image_data():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    data_suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".zip", ".npy", ".npz", ".safetensors", ".pt", ".pth")
    offenders = [f for f in listed.stdout.splitlines() if f.lower().endswith(data_suffixes)]
    assert offenders == []
