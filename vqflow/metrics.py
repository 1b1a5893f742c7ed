"""The ADer benchmark metrics, per category and as the mean over categories.

Image level: AUROC, AP, F1-max of the image scores. Pixel level: AUROC, AP, F1-max of the anomaly maps
against the ground-truth masks, and AUPRO. mAD is the mean of those seven.

AUPRO (ours, exact): ground-truth regions are the 8-connected components of each mask; for every distinct
threshold t, PRO(t) is the mean over all regions of the fraction of the region's pixels with score >= t and
FPR(t) is the fraction of normal pixels (of all images) with score >= t. The curve through those points
(from (0, 0)) is integrated with the trapezoid rule from FPR 0 to 0.3, interpolating the last segment
linearly at 0.3, and divided by 0.3. No min-max rescaling, no threshold sub-sampling: `pro_curve` computes
the same polyline from its corners, sorting only what lies above FPR 0.3 (bench/aupro.py: speed and equality
against the per-threshold reference).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)
WITHIN_IMAGE = np.zeros((3, 3, 3), dtype=int)  # 8-connected within an image of a (N, H, W) stack, never across
WITHIN_IMAGE[1] = EIGHT_CONNECTED
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
REPORTED = (*METRICS, "mad")  # what tables show (in %); metrics.json also holds "mad_count"


def _one_class(labels: np.ndarray) -> bool:
    return labels.size == 0 or labels.min() == labels.max()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    return float("nan") if _one_class(labels) else float(roc_auc_score(labels, np.asarray(scores).ravel()))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    return float("nan") if _one_class(labels) else float(average_precision_score(labels, np.asarray(scores).ravel()))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold reaching it (predict anomalous when score >= t)."""
    labels = np.asarray(labels).ravel()
    if _one_class(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best])


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x increasing) from x[0] to x_max, interpolating at x_max."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        nxt = int(keep.sum())
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def pro_curve(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Corners of the exact PRO curve (FPR, PRO) from (0, 0) to the first point past ``max_fpr``.

    Lowering the threshold through scores that only normal pixels have moves the curve horizontally, so the
    curve through every distinct threshold is the same polyline as the one through two points per distinct
    defect-pixel score t: (FPR(> t), PRO(> t)) and (FPR(>= t), PRO(>= t)). Only the normal pixels above the
    threshold where FPR passes ``max_fpr`` are sorted, and only the defect pixels are argsorted.
    """
    masks = masks.astype(bool)
    labels, regions = ndimage.label(masks, structure=WITHIN_IMAGE)  # labels unique over the stack
    normal_scores = maps[~masks]
    normal = normal_scores.size
    if regions == 0 or normal == 0:
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    # the first threshold with FPR > max_fpr is the k-th largest normal score, k = floor(max_fpr * normal) + 1
    k = min(int(np.floor(max_fpr * normal)) + 1, normal)
    last = np.partition(normal_scores, normal - k)[normal - k]
    normal_above = np.sort(normal_scores[normal_scores >= last])

    region_of = labels[masks]
    sizes = np.bincount(region_of, minlength=regions + 1).astype(np.float64)
    defect_scores = maps[masks]
    keep = defect_scores >= last
    region_of, defect_scores = region_of[keep], defect_scores[keep]
    order = np.argsort(-defect_scores, kind="stable")
    defect_scores = defect_scores[order]
    cumulative = np.r_[0.0, np.cumsum(1.0 / (regions * sizes[region_of[order]]))]
    thresholds = np.unique(np.r_[defect_scores, last])[::-1]
    descending = -defect_scores  # ascending, for searchsorted
    pro_above = cumulative[np.searchsorted(descending, -thresholds, side="left")]
    pro_at = cumulative[np.searchsorted(descending, -thresholds, side="right")]
    count = normal_above.size
    fpr_above = (count - np.searchsorted(normal_above, thresholds, side="right")) / normal
    fpr_at = (count - np.searchsorted(normal_above, thresholds, side="left")) / normal
    fpr = np.r_[0.0, np.column_stack([fpr_above, fpr_at]).ravel()]
    pro = np.r_[0.0, np.column_stack([pro_above, pro_at]).ravel()]
    return fpr, pro


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (NaN when there are no defect regions)."""
    masks = np.asarray(masks).astype(bool)
    if not masks.any() or masks.all():
        return float("nan")
    fpr, pro = pro_curve(np.asarray(maps), masks, max_fpr)
    return _trapezoid_to(np.minimum(fpr, 1.0), pro, max_fpr) / max_fpr


def float_order_bins(values: np.ndarray, bits: int) -> np.ndarray:
    """Bin index of each float32 value: its bit pattern made order-preserving, top ``bits`` bits kept. Bins need no
    score range and are relatively narrow everywhere (20 bits: 12 mantissa bits, a width of 2.4e-4 relative)."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    ordered = np.where(raw >> 31 == 1, ~raw, raw | np.uint32(1 << 31))
    return (ordered >> np.uint32(32 - bits)).astype(np.int64)


class PixelHistogram:
    """Pixel AUROC, AP, F1-max and AUPRO in fixed memory: normal and defect pixel counts per score bin, and per
    bin the sum over defect pixels of 1 / (size of the pixel's region), accumulated a batch of maps at a time.

    Binned: scores that share a bin count as tied. For large test sets, where the exact metrics would sort every
    pixel score; tests/test_metrics.py bounds the difference to the exact metrics by 1e-3.
    """

    def __init__(self, bits: int = 20):
        self.bits = bits
        self.normal = np.zeros(1 << bits, dtype=np.int64)
        self.defect = np.zeros(1 << bits, dtype=np.int64)
        self.region_weight = np.zeros(1 << bits, dtype=np.float64)
        self.regions = 0

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add maps and masks (N, H, W) of some images."""
        masks = np.asarray(masks).astype(bool)
        bins = float_order_bins(np.asarray(maps), self.bits)
        size = 1 << self.bits
        self.normal += np.bincount(bins[~masks], minlength=size)
        self.defect += np.bincount(bins[masks], minlength=size)
        labels, regions = ndimage.label(masks, structure=WITHIN_IMAGE)
        if regions:
            region_of = labels[masks]
            sizes = np.bincount(region_of, minlength=regions + 1).astype(np.float64)
            self.region_weight += np.bincount(bins[masks], weights=1.0 / sizes[region_of], minlength=size)
            self.regions += regions

    def metrics(self, max_fpr: float = 0.3) -> dict[str, float]:
        names = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
        negatives, positives = int(self.normal.sum()), int(self.defect.sum())
        if negatives == 0 or positives == 0:
            return dict.fromkeys(names, float("nan"))
        used = np.flatnonzero((self.normal + self.defect) > 0)[::-1]  # thresholds, highest first
        fp = np.cumsum(self.normal[used])
        tp = np.cumsum(self.defect[used])
        fpr, tpr = np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]
        precision = tp / (tp + fp)
        f1 = 2 * precision * tpr[1:] / np.maximum(precision + tpr[1:], 1e-12)
        pro = np.r_[0.0, np.cumsum(self.region_weight[used]) / self.regions]
        return {
            "pixel_auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
            "pixel_ap": float(np.sum(np.diff(tpr) * precision)),  # sklearn's step-wise definition
            "pixel_f1max": float(f1.max()),
            "pixel_aupro": _trapezoid_to(fpr, pro, max_fpr) / max_fpr,
        }


class PixelMetrics:
    """Pixel metrics of one category, accumulated a batch of maps at a time: exact while at most ``exact_limit``
    pixels have arrived (all of them are held), binned (``PixelHistogram``, fixed memory) from the batch that
    crosses it on. ``exact_limit=None``: always exact."""

    def __init__(self, exact_limit: int | None = None):
        self.exact_limit = exact_limit
        self._held: list[tuple[np.ndarray, np.ndarray]] = []
        self._pixels = 0
        self.histogram: PixelHistogram | None = None

    @property
    def binned(self) -> bool:
        return self.histogram is not None

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add maps and masks (N, H, W) of some images."""
        self._pixels += maps.size
        if self.histogram is None and (self.exact_limit is None or self._pixels <= self.exact_limit):
            self._held.append((maps, masks))
            return
        if self.histogram is None:
            self.histogram = PixelHistogram()
            for held in self._held:
                self._add_binned(*held)
            self._held = []
        self._add_binned(maps, masks)

    def _add_binned(self, maps: np.ndarray, masks: np.ndarray, images: int = 64) -> None:
        for start in range(0, len(maps), images):
            self.histogram.add(maps[start : start + images], masks[start : start + images])

    def metrics(self, max_fpr: float = 0.3) -> dict[str, float]:
        if self.histogram is not None:
            return self.histogram.metrics(max_fpr)
        if len(self._held) == 1:
            maps, masks = self._held[0]
        else:
            maps, masks = (np.concatenate(parts) for parts in zip(*self._held))
        pixel_labels = masks.astype(np.uint8)
        return {
            "pixel_auroc": auroc(pixel_labels, maps),
            "pixel_ap": average_precision(pixel_labels, maps),
            "pixel_f1max": f1_max(pixel_labels, maps)[0],
            "pixel_aupro": aupro(maps, masks, max_fpr),
        }


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, exact_limit: int | None = None) -> dict:
    """Pixel AUROC, AP, F1-max and AUPRO: exact up to ``exact_limit`` pixels (None: always), binned above it."""
    pixels = PixelMetrics(exact_limit)
    pixels.add(maps, masks)
    return pixels.metrics(max_fpr)


def category_metrics(labels: np.ndarray, scores: np.ndarray, pixels: PixelMetrics, max_fpr: float = 0.3) -> dict:
    """The seven metrics and mAD for one category: its labels and scores (N,) and its accumulated pixels."""
    values = {
        "image_auroc": auroc(labels, scores),
        "image_ap": average_precision(labels, scores),
        "image_f1max": f1_max(labels, scores)[0],
        **pixels.metrics(max_fpr),
    }
    finite = [v for v in values.values() if np.isfinite(v)]
    # mAD averages the metrics that exist (pixel metrics need masks; AUROC needs both classes): how many is
    # reported beside it, so a mAD of 3 image metrics is never mistaken for one of 7
    return {**values, "mad": float(np.mean(finite)) if finite else float("nan"), "mad_count": len(finite)}


def summarize(per_category: dict[str, dict], binned: list[str]) -> dict:
    """{"mean": {...}, "per_category": {...}}: the mean is over categories (NaNs skipped); categories whose pixel
    metrics are binned approximations (within 1e-3) are listed under "pixel_metrics_binned"."""
    names = next(iter(per_category.values())).keys()
    mean = {}
    for name in names:
        finite = [m[name] for m in per_category.values() if np.isfinite(m[name])]
        mean[name] = float(np.mean(finite)) if finite else float("nan")
    result = {"mean": mean, "per_category": per_category}
    if binned:
        result["pixel_metrics_binned"] = binned
    return result


def evaluate_categories(
    categories: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    max_fpr: float = 0.3,
    exact_limit: int | None = None,
) -> dict:
    """{"mean": {...}, "per_category": {category: {...}}}; the mean is over categories (NaNs skipped). Pixel
    metrics of a category with more than ``exact_limit`` pixels are binned (``PixelHistogram``)."""
    per_category, binned = {}, []
    for category in sorted(set(categories.tolist())):
        idx = categories == category
        pixels = PixelMetrics(exact_limit)
        pixels.add(maps[idx], masks[idx])
        per_category[category] = category_metrics(labels[idx], scores[idx], pixels, max_fpr)
        if pixels.binned:
            binned.append(category)
    return summarize(per_category, binned)
