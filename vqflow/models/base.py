"""The interface every anomaly model implements, so one loop trains them and one evaluator scores them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn


@dataclass
class StepOutput:
    """What a training step needs: the total loss, its named terms, and code indices for usage statistics."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Prediction:
    """Per image: anomaly score (higher = more anomalous), anomaly map at input size, and model extras."""

    scores: torch.Tensor
    maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class AnomalyModel(nn.Module):
    """A model over the cached backbone pyramid (list of 4 tensors at strides 4/8/16/32)."""

    codebook_sizes: dict[str, int] = {}

    @property
    def trainable(self) -> bool:
        """False for models fitted only by ``fit_statistics`` (no gradient training, e.g. PaDiM)."""
        return any(p.requires_grad for p in self.parameters())

    def initialize(self, features: list[torch.Tensor]) -> None:
        """Data-dependent initialisation before training (e.g. codebooks); default: nothing."""

    def training_chunks(self, features: list[torch.Tensor]) -> Iterable[Any]:
        """What one batch of images becomes for the optimiser: one step per chunk (default: the batch itself)."""
        yield features

    def training_step(self, chunk: Any) -> StepOutput:
        raise NotImplementedError

    def fit_statistics(self, batches: Iterable[list[torch.Tensor]]) -> None:
        """After training, in eval mode: statistics of the training data the scores need (default: none)."""

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> Prediction:
        raise NotImplementedError
