"""Slow, obviously-correct reference implementations that tests and benchmarks compare against."""

import numpy as np
from skimage import measure


def slow_aupro(maps, masks, max_fpr=0.3):
    """Reference: loop over every distinct threshold, skimage labelling, region by region."""
    masks = masks.astype(bool)
    regions = []
    for i, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        regions += [(i, labelled == r) for r in range(1, labelled.max() + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = np.array(points).T
    area, prev_x, prev_y = 0.0, 0.0, 0.0
    for x, y in zip(fprs[1:], pros[1:]):
        if x > max_fpr:
            y_at = prev_y + (y - prev_y) * (max_fpr - prev_x) / (x - prev_x)
            area += (max_fpr - prev_x) * (prev_y + y_at) / 2
            return area / max_fpr
        area += (x - prev_x) * (prev_y + y) / 2
        prev_x, prev_y = x, y
    return area / max_fpr
