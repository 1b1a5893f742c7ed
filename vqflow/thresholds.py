"""Decision thresholds, calibrated on held-out NORMAL images only (the "val" split carved from train/good).

The image threshold of a category is the (1 - target_frr) quantile of its validation scores, so about
``target_frr`` of good parts would be rejected; the pixel threshold (for predicted defect masks) is the
(1 - pixel_fpr) quantile of its validation anomaly-map values. A "global" entry pools every category, for
callers that do not know the category of an image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GLOBAL = "__global__"


def calibrate(val: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, target_frr: float, pixel_fpr: float) -> dict:
    """Thresholds from validation rows (all must be split "val" and normal) and their scores and maps."""
    if not 0 < target_frr < 1 or not 0 < pixel_fpr < 1:
        raise ValueError(f"thresholds need 0 < target_frr, pixel_fpr < 1 (got {target_frr}, {pixel_fpr})")
    if len(val) == 0:
        raise ValueError("no validation images: set prepare.val_fraction > 0 to calibrate thresholds")
    if (val["split"] != "val").any() or (val["label"] != 0).any():
        raise ValueError("thresholds may only be calibrated on normal images of the validation split")
    if len(val) != len(scores) or len(val) != len(maps):
        raise ValueError("validation rows, scores and maps differ in length")

    def entry(idx: np.ndarray) -> dict:
        return {
            "image": float(np.quantile(scores[idx], 1 - target_frr, method="higher")),
            "pixel": float(np.quantile(maps[idx], 1 - pixel_fpr, method="higher")),
            "val_images": int(idx.sum()),
        }

    categories = val["category"].to_numpy()
    result = {c: entry(categories == c) for c in sorted(set(categories))}
    result[GLOBAL] = entry(np.ones(len(val), dtype=bool))
    return {"target_frr": target_frr, "pixel_fpr": pixel_fpr, "categories": result}


def calibrated_categories(thresholds: dict) -> list[str]:
    """The categories with a threshold of their own (not the global one)."""
    return sorted(c for c in thresholds["categories"] if c != GLOBAL)


def threshold_for(thresholds: dict, category: str | None, kind: str = "image") -> float:
    """The threshold of ``category`` (the global one when it is None or unknown)."""
    entries = thresholds["categories"]
    return float(entries.get(category or GLOBAL, entries[GLOBAL])[kind])


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and false-reject rate of "anomalous when score > threshold"."""
    predicted = scores > threshold
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    normals = int((labels == 0).sum())
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_reject_rate": fp / normals if normals else float("nan"),
    }
