"""Concept-aware distribution modelling: a Gaussian base density whose mean and scale come from a prototype."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in a lower precision (bfloat16 under autocast); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(log_scale)^2), the -log sigma term included."""
    return -0.5 * ((z - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI


class ConceptGaussian(nn.Module):
    """Per-scale mean and log-scale networks of a prototype vector: N(mu_l(c), sigma_l(c)^2) per channel.

    The networks end in zero-initialised layers, so training starts from the standard normal. Log-scales are
    soft-bounded to (-max_log_scale, max_log_scale) to keep the density finite.
    """

    def __init__(self, prototype_dim: int, channels: Sequence[int], max_log_scale: float = 4.0):
        super().__init__()
        self.max_log_scale = max_log_scale

        def head(out: int) -> nn.Sequential:
            net = nn.Sequential(
                nn.Linear(prototype_dim, prototype_dim), nn.ReLU(inplace=True), nn.Linear(prototype_dim, out)
            )
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            return net

        self.means = nn.ModuleList(head(c) for c in channels)
        self.log_scales = nn.ModuleList(head(c) for c in channels)

    def forward(self, prototypes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, log_scale) per scale, each (N, C_l) for N prototype vectors (N, D)."""
        bound = self.max_log_scale
        return [(m(prototypes), bound * torch.tanh(s(prototypes) / bound)) for m, s in zip(self.means, self.log_scales)]


def summed_log_density(
    zs: Sequence[torch.Tensor], params: Sequence[tuple[torch.Tensor, torch.Tensor]] | None
) -> torch.Tensor:
    """Sum over scales, channels and pixels of log N(z_l; mean_l, scale_l^2) per image; N(0, I) if no params.
    In float32 whatever the flows and heads returned under autocast (bfloat16 sums of ~40k terms are tens of nats off)."""
    total = at_least_float32(zs[0].new_zeros(zs[0].shape[0]))
    for l, z in enumerate(zs):
        z = at_least_float32(z)
        if params is None:
            mean = log_scale = torch.zeros((), device=z.device, dtype=z.dtype)
        else:
            mean, log_scale = (at_least_float32(p[:, :, None, None]) for p in params[l])
        total = total + gaussian_log_density(z, mean, log_scale).sum((1, 2, 3))
    return total


def mixture_log_density(
    zs: Sequence[torch.Tensor], params: Sequence[tuple[torch.Tensor, torch.Tensor]], log_weights: torch.Tensor
) -> torch.Tensor:
    """log sum_k w_k prod_l N(z_l; mean_l(c_k), scale_l(c_k)^2) per image, from per-channel sufficient statistics.

    ``params`` hold (K, C_l) means and log-scales of all K prototypes; ``log_weights`` are (K,) log w_k.
    """
    per_component = log_weights[None].expand(zs[0].shape[0], -1)
    for z, (mean, log_scale) in zip(zs, params):
        z, mean, log_scale = (at_least_float32(t) for t in (z, mean, log_scale))  # as in summed_log_density
        pixels = z.shape[2] * z.shape[3]
        s1, s2 = z.sum((2, 3)), (z * z).sum((2, 3))  # (B, C)
        inv_var = torch.exp(-2 * log_scale)  # (K, C)
        quad = s2 @ inv_var.t() - 2 * s1 @ (mean * inv_var).t() + pixels * (mean * mean * inv_var).sum(1)[None]
        per_component = per_component - 0.5 * quad - pixels * (log_scale.sum(1)[None] + 0.5 * z.shape[1] * LOG_2PI)
    return torch.logsumexp(per_component, dim=1)
