import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from vqflow.testing import slow_aupro
from vqflow.metrics import METRICS, aupro, auroc, average_precision, evaluate_categories, f1_max


def _random_case(seed, n=6, size=32, levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    masks[0, 2:12, 3:9] = True  # a big region
    masks[0, 20, 20] = True  # a one-pixel region
    masks[1, 5:7, 5:7] = True
    masks[1, 8, 8] = True  # touches the 2x2 block diagonally: 8-connected, so one region with it?
    masks[2, 10:30, 0:4] = True
    masks[3, 0, 31] = True  # one pixel in a corner
    # images 4 and 5: no defective pixels at all
    maps = rng.random((n, size, size)) + 0.8 * masks * rng.random((n, size, size))
    maps = ndimage.gaussian_filter(maps, (0, 1, 1))
    if levels:
        maps = np.round(maps * levels) / levels
    return maps, masks


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 40), (3, 7)])
@pytest.mark.parametrize("max_fpr", [0.3, 0.02, 1.0])
def test_aupro_matches_the_slow_exact_reference(seed, levels, max_fpr):
    maps, masks = _random_case(seed, levels=levels)
    assert abs(aupro(maps, masks, max_fpr) - slow_aupro(maps, masks, max_fpr)) < 1e-9  # both exact


def test_aupro_edge_cases():
    maps, masks = _random_case(0)
    equal = np.full_like(maps, 0.5)
    assert abs(aupro(equal, masks) - slow_aupro(equal, masks)) < 1e-9
    assert abs(aupro(equal, masks) - 0.15) < 1e-9  # one threshold: the curve is the diagonal
    assert np.isnan(aupro(maps, np.zeros_like(masks)))
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert aupro(-perfect, masks) == pytest.approx(0.0)


def test_eight_connectivity_joins_diagonal_neighbours():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2, 2] = masks[0, 3, 3] = True  # diagonal neighbours: one region
    maps = np.zeros((1, 8, 8))
    maps[0, 2, 2] = 1.0  # finds half of the one region
    # with one 2-pixel region, PRO reaches 0.5 at FPR 0; with two regions it would be 0.5 too, so add a third pixel
    masks[0, 6, 6] = True
    # regions: {(2,2),(3,3)} and {(6,6)}; at the top threshold PRO = (0.5 + 0) / 2 = 0.25
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks))


def test_regions_never_span_two_images():
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 4, 4] = True  # the same pixel in both images: two regions, not one
    maps = np.zeros((2, 8, 8))
    maps[0, 4, 4] = 1.0  # finds one of two regions: PRO 0.5 at FPR 0 (one region of two pixels would give 0.5 too)
    maps[1, 0, 0] = 0.5  # ... so a normal pixel in between separates the two readings
    masks[1, 4, 5] = True  # image 1's region has two pixels, image 0's one
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-12)


def test_auroc_and_ap_equal_sklearn():
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 500), rng.random(500)
    assert auroc(labels, scores) == roc_auc_score(labels, scores)
    assert average_precision(labels, scores) == average_precision_score(labels, scores)
    assert np.isnan(auroc(np.zeros(5), scores[:5]))


def test_f1_max_equals_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 2)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = (pred & (labels == 1)).sum()
        precision, recall = tp / max(pred.sum(), 1), tp / (labels == 1).sum()
        if precision + recall:
            best = max(best, 2 * precision * recall / (precision + recall))
    value, threshold = f1_max(labels, scores)
    assert value == pytest.approx(best)
    pred = scores >= threshold
    tp = (pred & (labels == 1)).sum()
    assert 2 * tp / (pred.sum() + (labels == 1).sum()) == pytest.approx(best)


def test_per_category_and_mean():
    maps, masks = _random_case(0)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    categories = np.array(["a", "a", "a", "b", "b", "b"])
    result = evaluate_categories(categories, labels, scores, maps, masks)
    assert set(result["per_category"]) == {"a", "b"}
    assert len(result["mean"]) == 9  # seven metrics, mad and mad_count
    a, b = result["per_category"]["a"], result["per_category"]["b"]
    assert np.isnan(a["image_auroc"])  # category a has no normal image
    assert result["mean"]["image_auroc"] == b["image_auroc"]
    assert result["mean"]["pixel_aupro"] == pytest.approx((a["pixel_aupro"] + b["pixel_aupro"]) / 2)
    assert a["mad"] == pytest.approx(np.nanmean([a[k] for k in METRICS]))
    assert a["mad_count"] == sum(np.isfinite(a[k]) for k in METRICS) < 7 and b["mad_count"] == 7


def test_mad_averages_the_metrics_that_exist_and_says_how_many():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = rng.random(6) + labels
    maps = rng.random((6, 8, 8))
    no_masks = np.zeros((6, 8, 8), bool)  # semantic AD: no pixel ground truth, pixel metrics are NaN
    result = evaluate_categories(np.array(["a"] * 6), labels, scores, maps, no_masks)["per_category"]["a"]
    image = [roc_auc_score(labels, scores), average_precision_score(labels, scores), f1_max(labels, scores)[0]]
    assert result["mad_count"] == 3 and np.isnan(result["pixel_auroc"])
    assert result["mad"] == pytest.approx(np.mean(image), abs=1e-12)
    masks = np.zeros((6, 8, 8), bool)
    masks[labels == 1, 2:5, 2:5] = True
    assert evaluate_categories(np.array(["a"] * 6), labels, scores, maps, masks)["per_category"]["a"]["mad_count"] == 7


def _smooth_maps(seed, count=24, size=64):
    """Maps like a model's (smooth, negative and positive values, defects scoring higher) and masks of blobs."""
    rng = np.random.default_rng(seed)
    maps = ndimage.gaussian_filter(rng.normal(size=(count, size, size)), (0, 2, 2)) * 5 - 1
    masks = ndimage.gaussian_filter(rng.normal(size=(count, size, size)), (0, 3, 3)) > 0.15
    masks[: count // 3] = False  # normal images
    maps = maps + 3.0 * masks * rng.uniform(0.2, 1.0, size=(count, 1, 1))
    return maps.astype(np.float32), masks


def test_float_order_bins_keep_the_order_of_the_scores():
    from vqflow.metrics import float_order_bins

    values = np.sort(np.random.default_rng(0).normal(scale=1e3, size=10_000).astype(np.float32))
    bins = float_order_bins(values, 20)
    assert np.all(np.diff(bins) >= 0) and bins.min() >= 0 and bins.max() < 1 << 20
    assert float_order_bins(np.float32([-0.0, 0.0]), 32)[0] < float_order_bins(np.float32([-0.0, 0.0]), 32)[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_pixel_metrics_equal_the_exact_ones_to_1e3(seed):
    from vqflow.metrics import PixelHistogram, pixel_metrics

    maps, masks = _smooth_maps(seed)
    exact = pixel_metrics(maps, masks, 0.3)
    binned = pixel_metrics(maps, masks, 0.3, exact_limit=maps.size - 1)
    assert set(binned) == set(exact)
    for name, value in exact.items():
        assert 0.5 < value < 1.0, name  # a case where the metric means something
        assert abs(binned[name] - value) <= 1e-3, (name, binned[name], value)
    coarse = PixelHistogram(bits=10)  # too few bins: the comparison above can fail
    coarse.add(maps, masks)
    assert max(abs(coarse.metrics()[n] - exact[n]) for n in exact) > 1e-3
    in_parts = PixelHistogram()
    for start in range(0, len(maps), 5):
        in_parts.add(maps[start : start + 5], masks[start : start + 5])
    assert in_parts.metrics() == binned


def test_evaluation_bins_only_the_categories_above_the_limit_and_says_so():
    maps, masks = _smooth_maps(0, count=12)
    categories = np.array(["big"] * 8 + ["small"] * 4)
    labels = masks.any((1, 2)).astype(int)
    scores = maps.max((1, 2))
    limit = 6 * 64 * 64
    result = evaluate_categories(categories, labels, scores, maps, masks, exact_limit=limit)
    exact = evaluate_categories(categories, labels, scores, maps, masks)
    assert result["pixel_metrics_binned"] == ["big"] and "pixel_metrics_binned" not in exact
    assert result["per_category"]["small"] == pytest.approx(exact["per_category"]["small"], nan_ok=True, abs=0)
    big, reference = result["per_category"]["big"], exact["per_category"]["big"]
    assert big != reference and all(abs(big[k] - reference[k]) <= 1e-3 for k in METRICS)


def test_pixel_metrics_a_batch_at_a_time_are_exact_up_to_the_limit_then_binned():
    from vqflow.metrics import PixelHistogram, PixelMetrics, pixel_metrics

    maps, masks = _smooth_maps(1)
    exact = pixel_metrics(maps, masks)
    below, crossing = PixelMetrics(maps.size), PixelMetrics(maps.size - 1)
    for start in range(0, len(maps), 5):
        below.add(maps[start : start + 5], masks[start : start + 5])
        crossing.add(maps[start : start + 5], masks[start : start + 5])
    assert not below.binned and below.metrics() == exact
    histogram = PixelHistogram()
    histogram.add(maps, masks)
    assert crossing.binned and crossing.metrics() == histogram.metrics()


def test_the_evaluate_stage_streams_to_the_same_metrics_as_all_maps_in_memory(trained_project):
    """measure_test_split (one category and one batch of maps at a time) against evaluate_categories on every map
    of the test split at once, exact and binned."""
    import torch

    from vqflow.stages.common import manifest_and_cache
    from vqflow.stages.evaluate import ground_truth_masks, measure_test_split
    from vqflow.bundle import ModelBundle
    from vqflow.scoring import score_cached

    _, params = trained_project
    cpu = torch.device("cpu")
    manifest, cache = manifest_and_cache(params)
    model = ModelBundle(params["outputs"]["model"]).load_model(cpu)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    scored = score_cached(model, cache, test.image_id.tolist(), cpu, progress=False)
    masks = ground_truth_masks(test, scored.maps.shape[-1])
    arrays = (test.category.to_numpy(), test.label.to_numpy(), scored.scores, scored.maps, masks, 0.3)
    for limit in (None, 5 * scored.maps[0].size):  # 5 maps: crossed inside each category's second batch
        reference = evaluate_categories(*arrays, limit)
        metrics, scores, extras = measure_test_split(model, cache, test, cpu, 3, 0.3, limit)
        np.testing.assert_allclose(scores, scored.scores, rtol=1e-5)
        assert metrics.get("pixel_metrics_binned") == reference.get("pixel_metrics_binned")
        for category, values in reference["per_category"].items():
            assert metrics["per_category"][category] == pytest.approx(values, abs=1e-4, nan_ok=True), category
    assert limit and metrics["pixel_metrics_binned"] == sorted(set(test.category))
    assert set(extras) == {k for k, v in scored.extras.items() if v.ndim == 1}
