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


class UpperQuantile:
    """``np.quantile(values, q, method="higher")`` of ``total`` values that arrive in parts, holding only the
    values at or above it (the top ``1 - q`` fraction): a pixel threshold of any number of validation maps."""

    def __init__(self, total: int, q: float):
        self.total, self.seen = total, 0
        self.keep = total - int(np.ceil((total - 1) * q))  # numpy's "higher" index, counted from the top
        self.top = np.empty(0, dtype=np.float64)

    def add(self, values: np.ndarray) -> None:
        values = np.ravel(values)
        self.seen += values.size
        merged = np.concatenate([self.top, values])
        if merged.size > self.keep:
            merged = np.partition(merged, merged.size - self.keep)[merged.size - self.keep :]
        self.top = merged

    def value(self) -> float:
        if self.seen != self.total:
            raise ValueError(f"quantile of {self.total} values asked after {self.seen}")
        return float(self.top.min())


class Calibration:
    """Thresholds from validation rows (all must be split "val" and normal), their scores and maps added a batch
    at a time in row order (``add``); memory: the scores and the top ``pixel_fpr`` of the map values."""

    def __init__(self, val: pd.DataFrame, target_frr: float, pixel_fpr: float):
        if not 0 < target_frr < 1 or not 0 < pixel_fpr < 1:
            raise ValueError(f"thresholds need 0 < target_frr, pixel_fpr < 1 (got {target_frr}, {pixel_fpr})")
        if len(val) == 0:
            raise ValueError("no validation images: set prepare.val_fraction > 0 to calibrate thresholds")
        if (val["split"] != "val").any() or (val["label"] != 0).any():
            raise ValueError("thresholds may only be calibrated on normal images of the validation split")
        self.target_frr, self.pixel_fpr = target_frr, pixel_fpr
        self.categories = val["category"].to_numpy()
        self.scores = np.full(len(val), np.nan)
        self.seen = 0
        self.pixels: dict[str, UpperQuantile] = {}

    def add(self, scores: np.ndarray, maps: np.ndarray) -> None:
        """Scores (B,) and maps (B, H, W) of the next B validation rows."""
        if len(scores) != len(maps) or self.seen + len(scores) > len(self.scores):
            raise ValueError("validation rows, scores and maps differ in length")
        rows = slice(self.seen, self.seen + len(scores))
        self.scores[rows] = scores
        categories = self.categories[rows]
        if not self.pixels:
            per_map = int(np.prod(maps.shape[1:]))
            counts = {c: int((self.categories == c).sum()) for c in set(self.categories)}
            counts[GLOBAL] = len(self.categories)
            self.pixels = {c: UpperQuantile(n * per_map, 1 - self.pixel_fpr) for c, n in counts.items()}
        for category in set(categories):
            self.pixels[category].add(maps[categories == category])
        self.pixels[GLOBAL].add(maps)
        self.seen += len(scores)

    def result(self) -> dict:
        if self.seen != len(self.scores):
            raise ValueError("validation rows, scores and maps differ in length")

        def entry(category: str) -> dict:
            idx = self.categories == category if category != GLOBAL else np.ones(self.seen, dtype=bool)
            return {
                "image": float(np.quantile(self.scores[idx], 1 - self.target_frr, method="higher")),
                "pixel": self.pixels[category].value(),
                "val_images": int(idx.sum()),
            }

        result = {c: entry(c) for c in sorted(set(self.categories))}
        result[GLOBAL] = entry(GLOBAL)
        return {"target_frr": self.target_frr, "pixel_fpr": self.pixel_fpr, "categories": result}


def calibrate(val: pd.DataFrame, scores: np.ndarray, maps: np.ndarray, target_frr: float, pixel_fpr: float) -> dict:
    """Thresholds from validation rows (all must be split "val" and normal) and all their scores and maps."""
    calibration = Calibration(val, target_frr, pixel_fpr)
    calibration.add(scores, maps)
    return calibration.result()


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
