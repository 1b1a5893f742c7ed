"""Scoring: run a trained model over cached features or raw images (one inference path for every caller)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .backbones import FeaturePyramid
from .features import FeatureCache
from .models import AnomalyModel


@dataclass
class Scored:
    """Scores (N,), anomaly maps (N, S, S) float32 and extras (e.g. concept ids) of N images, in input order."""

    scores: np.ndarray
    maps: np.ndarray
    extras: dict[str, np.ndarray]


def _to_numpy(prediction) -> Scored:
    extras = {k: v.cpu().numpy() for k, v in prediction.extras.items()}
    return Scored(
        prediction.scores.cpu().numpy().astype(np.float64), prediction.maps.cpu().numpy().astype(np.float32), extras
    )


def concatenate(parts: Sequence[Scored]) -> Scored:
    """One Scored of several, in order."""
    return Scored(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.maps for p in parts]),
        {k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras},
    )


def score_batches(
    model: AnomalyModel,
    cache: FeatureCache,
    image_ids: Sequence[str],
    device: torch.device,
    batch_size: int = 16,
    progress: bool = True,
) -> Iterator[tuple[slice, Scored]]:
    """Score images of the feature cache by id a batch at a time: yields (positions in ``image_ids``, Scored), so a
    caller can reduce each batch and keep nothing of it (only one batch of features and maps in memory)."""
    model.eval().to(device)
    ids = list(image_ids)
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids), batch_size), desc="scoring", unit="batch", disable=not progress):
            feats = cache.get(ids[start : start + batch_size])
            yield slice(start, start + len(feats[0])), _to_numpy(model.predict([f.to(device) for f in feats]))


def score_cached(*args, **kwargs) -> Scored:
    """``score_batches`` (same arguments) with every batch kept: for a few images, or callers that need all maps."""
    return concatenate([scored for _, scored in score_batches(*args, **kwargs)])


@torch.inference_mode()
def score_images(model: AnomalyModel, backbone: FeaturePyramid, images: torch.Tensor, device: torch.device) -> Scored:
    """Score a batch of preprocessed images (B, 3, S, S) in [0, 1]: backbone, then the model."""
    model.eval().to(device)
    backbone.to(device)
    return _to_numpy(model.predict(backbone(images.to(device))))
