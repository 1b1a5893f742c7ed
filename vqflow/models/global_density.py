"""A Gaussian density of an image's globally pooled feature: how unlike the training images it is as a whole."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from .anomaly_map import floored_std


class PooledGaussian(nn.Module):
    """N(mean, Sigma) over pooled features (B, C), Sigma by Ledoit-Wolf shrinkage: a full covariance of C channels
    from as few training images as a small product line has (shrinkage keeps it well conditioned when images < C).

    ``log_density`` is log p per dimension up to a constant, -0.5 (x - mean)^T Sigma^-1 (x - mean) / C, the
    units of the flows' per-pixel maps (-0.5 times the channel mean of squared standardised values)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        # W with ||(x - mean) W||^2 = the squared Mahalanobis distance: one matmul at inference (and in ONNX)
        self.register_buffer("whitening", torch.eye(channels))
        self.register_buffer("nll_mean", torch.zeros(()))  # of -log_density over the training images
        self.register_buffer("nll_std", torch.ones(()))

    @torch.no_grad()
    def fit(self, pooled: torch.Tensor) -> None:
        """Fit on the training images' pooled features (N, C), in float64."""
        if len(pooled) < 2:
            raise ValueError(f"model.global_gaussian needs at least 2 training images, got {len(pooled)}")
        data = pooled.double().cpu().numpy()
        estimate = LedoitWolf().fit(data)
        self.mean.copy_(torch.from_numpy(estimate.location_))
        self.whitening.copy_(torch.from_numpy(np.linalg.cholesky(estimate.precision_)))  # Sigma^-1 = W W^T
        nll = -self.log_density(pooled.to(self.mean)).double()
        self.nll_mean.copy_(nll.mean())
        self.nll_std.copy_(floored_std(nll.std(correction=0)))

    def log_density(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B,): log p per dimension up to a constant."""
        white = (pooled - self.mean) @ self.whitening
        return -0.5 * (white * white).mean(1)

    def standardized_nll(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B,): -log p in units of its spread over the training images (for per-position standardised maps)."""
        return (-self.log_density(pooled) - self.nll_mean) / self.nll_std
