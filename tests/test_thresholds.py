import numpy as np
import pandas as pd
import pytest
import torch

from vqflow.thresholds import GLOBAL, calibrate, decision_metrics, threshold_for


def _val(n_per=50, categories=("a", "b")):
    return pd.DataFrame({"category": np.repeat(categories, n_per), "split": "val", "label": 0})


def test_threshold_is_the_val_quantile_and_rejects_about_target_frr():
    rng = np.random.default_rng(0)
    val = _val(200)
    scores = np.r_[rng.normal(0, 1, 200), rng.normal(5, 1, 200)]
    maps = rng.random((400, 4, 4))
    result = calibrate(val, scores, maps, target_frr=0.05, pixel_fpr=0.01)
    a = result["categories"]["a"]["image"]
    assert a == np.quantile(scores[:200], 0.95, method="higher")
    assert (scores[:200] > a).mean() <= 0.05
    assert result["categories"]["b"]["image"] > a + 3
    assert threshold_for(result, "b") == result["categories"]["b"]["image"]
    assert threshold_for(result, None) == threshold_for(result, "unknown") == result["categories"][GLOBAL]["image"]
    assert result["categories"]["a"]["pixel"] == np.quantile(maps[:200], 0.99, method="higher")


def test_calibration_refuses_test_or_defective_rows():
    val = _val(5)
    val.loc[3, "split"] = "test"
    with pytest.raises(ValueError, match="only be calibrated on normal images of the validation split"):
        calibrate(val, np.zeros(10), np.zeros((10, 2, 2)), 0.01, 0.01)
    val = _val(5)
    val.loc[0, "label"] = 1
    with pytest.raises(ValueError, match="validation split"):
        calibrate(val, np.zeros(10), np.zeros((10, 2, 2)), 0.01, 0.01)
    with pytest.raises(ValueError, match="val_fraction"):
        calibrate(_val(0), np.zeros(0), np.zeros((0, 2, 2)), 0.01, 0.01)


def test_decision_metrics():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.95])
    m = decision_metrics(labels, scores, 0.5)
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert m["false_reject_rate"] == pytest.approx(1 / 3)


def test_the_train_stage_scores_only_validation_images(tiny_dataset, tmp_path):
    """Thresholds come from the pipeline's calibration, which may read val features only."""
    from tests.test_vqflow_model import _model
    from vqflow import stages
    from vqflow.data.manifest import build_manifest
    from vqflow.data.mvtec import read_mvtec

    manifest = build_manifest(read_mvtec(tiny_dataset), 0.34, 0, progress=False)

    class RecordingCache:
        requested: list[str] = []

        def get(self, ids):
            self.requested += list(ids)
            g = torch.Generator().manual_seed(len(ids))
            return [
                torch.randn(len(ids), c, 32 // s, 32 // s, generator=g) for c, s in zip([4, 6, 8, 10], (4, 8, 16, 32))
            ]

    cache = RecordingCache()
    params = {"thresholds": {"target_frr": 0.01, "pixel_fpr": 0.01}}
    result = stages.calibrate_thresholds(params, _model(), manifest, cache, torch.device("cpu"))
    splits = set(manifest.set_index("image_id").loc[cache.requested, "split"])
    assert splits == {"val"}
    assert set(result["categories"]) == {"chip", "fabric", GLOBAL}
