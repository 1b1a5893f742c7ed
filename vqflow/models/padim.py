"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization").

Not trained by gradient: one multivariate Gaussian per feature-map position, fitted on the training images.

- Embedding: the chosen pyramid stages (default strides 8 and 16) brought to the finest one's grid (nearest
  upsampling, as PaDiM's patch concatenation does) and concatenated; optionally a seeded random subset of
  ``channels`` of them (the paper's dimensionality reduction).
- Fit: per position the mean and covariance (float64) + ``epsilon`` I; the inverse by Cholesky in float64
  (batched ``torch.linalg.inv`` is unreliable on our CPU build).
- Score: per position the Mahalanobis distance, upsampled bilinearly, Gaussian-smoothed (sigma 4); the image
  score is the map's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .registry import register_model
from .anomaly_map import gaussian_smooth, upsample
from .base import AnomalyModel, Prediction


@dataclass
class PaDiMConfig:
    in_channels: list[int] = field(default_factory=lambda: [24, 40, 112, 320])
    image_size: int = 256
    stages: list[int] = field(default_factory=lambda: [1, 2])  # strides 8 and 16
    channels: int = 0  # random subset of the concatenated channels; 0 = all
    seed: int = 0
    epsilon: float = 0.01  # covariance regulariser (paper 0.01)
    smoothing_sigma: float = 4.0

    def __post_init__(self):
        bad = [s for s in self.stages if not 0 <= s < len(self.in_channels)]
        if not self.stages or bad or sorted(self.stages) != self.stages:
            raise ValueError(
                f"model.padim.stages: {self.stages} must be increasing stages 0..{len(self.in_channels) - 1}"
            )
        if not 0 <= self.channels <= self.total_channels:
            raise ValueError(f"model.padim.channels must be 0 (all) or 1..{self.total_channels}, got {self.channels}")

    @property
    def total_channels(self) -> int:
        return sum(self.in_channels[s] for s in self.stages)

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (self.stages[0] + 2)  # stage s has stride 2^(s+2)


class PaDiM(AnomalyModel):
    def __init__(self, config: PaDiMConfig):
        super().__init__()
        self.config = cfg = config
        dims = cfg.channels or cfg.total_channels
        positions = cfg.grid * cfg.grid
        generator = torch.Generator().manual_seed(cfg.seed)
        chosen = torch.randperm(cfg.total_channels, generator=generator)[:dims].sort().values
        self.register_buffer("channel_index", chosen if cfg.channels else torch.arange(cfg.total_channels))
        self.register_buffer("mean", torch.zeros(positions, dims))
        self.register_buffer("precision", torch.zeros(positions, dims, dims))

    def embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, positions, dims): the chosen stages on the finest grid, concatenated, channel subset applied."""
        grid = self.config.grid
        maps = [
            features[s]
            if features[s].shape[-1] == grid
            else F.interpolate(features[s], size=(grid, grid), mode="nearest")
            for s in self.config.stages
        ]
        x = torch.cat(maps, 1)[:, self.channel_index]
        return x.flatten(2).transpose(1, 2)

    def fit_statistics(self, batches) -> None:
        count, total, outer = 0, None, None
        for features in batches:
            x = self.embedding(features).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            products = torch.einsum("bnd,bne->nde", x, x)
            outer = products if outer is None else outer + products
            count += len(x)
        if count < 2:
            raise ValueError("padim needs at least 2 training images to fit a covariance")
        mean = total / count
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        cov = cov + self.config.epsilon * torch.eye(cov.shape[-1], dtype=cov.dtype)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(cov))
        self.mean.copy_(mean.float())
        self.precision.copy_(precision.float())

    def distances(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Mahalanobis distance of every position to its Gaussian, (B, grid, grid)."""
        diff = self.embedding(features) - self.mean
        squared = torch.einsum("bnd,nde,bne->bn", diff, self.precision, diff)
        grid = self.config.grid
        return squared.clamp_min(0).sqrt().view(-1, grid, grid)

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> Prediction:
        cfg = self.config
        anomaly_map = upsample(self.distances(features), cfg.image_size)
        if cfg.smoothing_sigma > 0:
            anomaly_map = gaussian_smooth(anomaly_map, cfg.smoothing_sigma)
        return Prediction(anomaly_map.flatten(1).amax(1), anomaly_map)


@register_model("padim", PaDiMConfig)
def build_padim(config: PaDiMConfig) -> PaDiM:
    return PaDiM(config)
