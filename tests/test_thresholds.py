import numpy as np
import pandas as pd
import pytest
import torch

from vqflow.thresholds import GLOBAL, Calibration, UpperQuantile, calibrate, decision_metrics, threshold_for


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


@pytest.mark.parametrize("seed", range(4))
def test_upper_quantile_in_parts_equals_numpy_and_holds_only_the_top(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=int(rng.integers(1, 3000))).astype(np.float32)
    if seed % 2:
        values = np.round(values, 1)  # many ties
    for q in (0.0, 0.5, 0.99, 0.995, 1 - 1e-4):
        quantile = UpperQuantile(values.size, q)
        for part in np.array_split(values, int(rng.integers(1, 20))):
            quantile.add(part)
        assert quantile.value() == float(np.quantile(values, q, method="higher")), q
        assert quantile.top.size <= values.size * (1 - q) + 1
    with pytest.raises(ValueError, match="asked after"):
        UpperQuantile(10, 0.5).value()


def test_calibration_a_batch_at_a_time_equals_calibration_at_once():
    rng = np.random.default_rng(4)
    val = pd.DataFrame({"category": rng.choice(["a", "b", "c"], 90), "split": "val", "label": 0})  # interleaved
    scores, maps = rng.normal(size=90), rng.random((90, 5, 5)).astype(np.float32)
    at_once = calibrate(val, scores, maps, 0.05, 0.01)
    calibration = Calibration(val, 0.05, 0.01)
    for rows in np.array_split(np.arange(90), 7):
        calibration.add(scores[rows], maps[rows])
    assert calibration.result() == at_once
    for category in "abc":
        in_category = (val.category == category).to_numpy()
        assert at_once["categories"][category]["pixel"] == np.quantile(maps[in_category], 0.99, method="higher")
    assert at_once["categories"][GLOBAL]["pixel"] == np.quantile(maps, 0.99, method="higher")
    unfinished = Calibration(val, 0.05, 0.01)
    unfinished.add(scores[:10], maps[:10])
    with pytest.raises(ValueError, match="differ in length"):
        unfinished.result()


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
    from vqflow.stages.calibrate import thresholds_of
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
    result = thresholds_of(params, _model(), manifest, cache, torch.device("cpu"))
    splits = set(manifest.set_index("image_id").loc[cache.requested, "split"])
    assert splits == {"val"}
    assert set(result["categories"]) == {"chip", "fabric", GLOBAL}
