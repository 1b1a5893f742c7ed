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


def log_map(log_p: Sequence[torch.Tensor], size: int, reference: torch.Tensor | None = None) -> torch.Tensor:
    """c - sum_l log p_l (upsampled): the log of MSFlow's "mul" map, which cannot saturate in float32.

    ``reference`` c is a constant fitted on training images (a global drop in likelihood raises every pixel);
    without it, each image's own maximum (MSFlow: only the shape of the map within the image counts).
    """
    total = sum(upsample(m, size) for m in log_p)
    return (reference if reference is not None else _image_max(total)) - total


def add_map(log_p: Sequence[torch.Tensor], size: int, references: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """MSFlow's "add" aggregation: L - sum_l exp(log p_l - c_l), c_l = per-image max of scale l or ``references[l]``."""
    refs = references if references is not None else [_image_max(m) for m in log_p]
    probs = sum(upsample(torch.exp(m - c), size) for m, c in zip(log_p, refs))
    return len(log_p) - probs


def floored_std(std: torch.Tensor) -> torch.Tensor:
    """A per-position std with a floor (0.001 + 1 % of its mean): a position that hardly varied on the training
    images must not turn noise into huge z values."""
    return std.clamp_min(1e-3 + 1e-2 * float(std.mean()))


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of maps (B, H, W), mirrored borders, truncated at 4 sigma: what
    ``scipy.ndimage.gaussian_filter(mode="mirror")`` computes, as two 1-D convolutions (66 instead of
    1089 multiply-adds per pixel at sigma 4)."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps)
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return F.conv2d(x, kernel.view(1, 1, 1, -1))[:, 0]


def top_k_score(anomaly_map: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of pixels of each map (B, H, W) -> (B,)."""
    flat = anomaly_map.flatten(1)
    k = max(1, round(fraction * int(flat.shape[1])))  # int(): a constant when traced for ONNX (fixed map size)
    return flat.topk(k, dim=1).values.mean(1)
