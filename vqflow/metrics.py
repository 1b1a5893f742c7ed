"""Detection and localisation metrics, per category and as the mean over categories."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def _safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return float("nan")  # undefined with one class
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def category_metrics(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Metrics of one category: image-level from scores (N,), pixel-level from maps and masks (N, H, W)."""
    return {
        "image_auroc": _safe_auroc(labels, scores),
        "pixel_auroc": _safe_auroc(masks.astype(np.uint8), maps),
    }


def evaluate_categories(categories: np.ndarray, labels: np.ndarray, scores: np.ndarray, maps: np.ndarray,
                        masks: np.ndarray) -> dict:
    """{"mean": {...}, "per_category": {category: {...}}}; the mean is over categories (NaNs skipped)."""
    per_category = {}
    for category in sorted(set(categories.tolist())):
        idx = categories == category
        per_category[category] = category_metrics(labels[idx], scores[idx], maps[idx], masks[idx])
    names = next(iter(per_category.values())).keys()
    mean = {name: float(np.nanmean([m[name] for m in per_category.values()])) for name in names}
    return {"mean": mean, "per_category": per_category}
