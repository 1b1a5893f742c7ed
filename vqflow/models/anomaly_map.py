"""From per-scale log-likelihood maps to anomaly maps and image scores (higher = more anomalous).

Only per-image statistics or constants fitted on training data are used: nothing here ever sees another
test image.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) -> (B, size, size), bilinear."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _image_max(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).max(1).values[:, None, None]


def mul_map(log_p: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """MSFlow's "mul" aggregation: 1 - exp(sum_l log p_l - per-image max)."""
    total = sum(upsample(m, size) for m in log_p)
    return 1.0 - torch.exp(total - _image_max(total))


def add_map(log_p: Sequence[torch.Tensor], size: int, references: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """MSFlow's "add" aggregation: L - sum_l exp(log p_l - c_l), c_l = per-image max of scale l or ``references[l]``."""
    refs = references if references is not None else [_image_max(m) for m in log_p]
    probs = sum(upsample(torch.exp(m - c), size) for m, c in zip(log_p, refs))
    return len(log_p) - probs


def top_k_score(anomaly_map: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of pixels of each map (B, H, W) -> (B,)."""
    flat = anomaly_map.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)
