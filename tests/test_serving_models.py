"""Every baseline goes through the same pipeline, export and `bentoml serve` as VQ-Flow (test_serving.py), served
from its ONNX graph (serve.runtime: onnx; the torch runtime is the same code for every model, test_serving.py)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import requests

from tests.conftest import tiny_params
from vqflow.testing import bentoml_server, export_for_serving

pytestmark = pytest.mark.slow  # every model trained by the pipeline and served by bentoml

TINY_SECTIONS = {
    "cflow": {"coupling_blocks": 2, "pe_channels": 16, "chunk_size": 64},
    "vitad": {"decoder_dim": 32, "decoder_heads": 2, "blocks_per_stage": 1, "smoothing_sigma": 2.0, "pool_size": 8},
}


@pytest.mark.parametrize("name", sorted(TINY_SECTIONS))
def test_model_is_trained_by_the_pipeline_and_served(name, tmp_path):
    from vqflow import stages

    params = tiny_params(tmp_path)
    params["model"] = {"name": name, name: TINY_SECTIONS[name]}
    params["package"] = {"onnx": True}
    stages.run_all(params, ("generate", "prepare", "validate", "features", "train", "calibrate", "package", "evaluate"))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    tag, _ = export_for_serving(tmp_path, params, env)  # raises with export's stderr when it fails

    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    offline = pd.read_csv(params["outputs"]["scores"], dtype={"image_id": str}).set_index("image_id")
    thresholds = json.loads((Path(params["outputs"]["model"]) / "thresholds.json").read_text())
    with bentoml_server({**env, "VQFLOW_MODEL_TAG": tag, "VQFLOW_RUNTIME": "onnx"}) as (url, _):
        for _, row in manifest[manifest.split == "test"].iterrows():
            response = requests.post(
                f"{url}/predict",
                files={"image": ("x.png", Path(row.path).read_bytes(), "image/png")},
                data={"category": row.category, "with_map": "true"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            expected = offline.loc[row.image_id, "score"]
            # ONNX Runtime vs the offline (torch) evaluation: 1e-4 relative (vqflow/onnx_graph.py)
            assert abs(body["score"] - expected) <= 1e-4 * max(1.0, abs(expected)), (name, row.path, body["score"])
            assert body["is_anomaly"] == (expected > thresholds["categories"][row.category]["image"])
            assert body["model_tag"] == tag and body["concept"] is None and body["anomaly_map_png"]
        bad = requests.post(f"{url}/predict", files={"image": ("x.png", b"not an image", "image/png")}, timeout=60)
        assert 400 <= bad.status_code < 500
