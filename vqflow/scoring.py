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


def _collect(outputs: list) -> Scored:
    scores = np.concatenate([o.scores.cpu().numpy() for o in outputs]).astype(np.float64)
    maps = np.concatenate([o.maps.cpu().numpy() for o in outputs]).astype(np.float32)
    keys = outputs[0].extras.keys() if outputs else []
    extras = {k: np.concatenate([o.extras[k].cpu().numpy() for o in outputs]) for k in keys}
    return Scored(scores, maps, extras)


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
            yield slice(start, start + len(feats[0])), _collect([model.predict([f.to(device) for f in feats])])


def score_cached(
    model: AnomalyModel,
    cache: FeatureCache,
    image_ids: Sequence[str],
    device: torch.device,
    batch_size: int = 16,
    progress: bool = True,
) -> Scored:
    """Score images of the feature cache by id; every map is kept (for few images: see ``score_batches``)."""
    batches = [scored for _, scored in score_batches(model, cache, image_ids, device, batch_size, progress)]
    if not batches:
        return _collect([])
    return Scored(
        np.concatenate([b.scores for b in batches]),
        np.concatenate([b.maps for b in batches]),
        {k: np.concatenate([b.extras[k] for b in batches]) for k in batches[0].extras},
    )


@torch.inference_mode()
def score_images(model: AnomalyModel, backbone: FeaturePyramid, images: torch.Tensor, device: torch.device) -> Scored:
    """Score a batch of preprocessed images (B, 3, S, S) in [0, 1]: backbone, then the model."""
    model.eval().to(device)
    backbone.to(device)
    return _collect([model.predict(backbone(images.to(device)))])
