"""Vector quantisation with EMA codebooks, as used by both VQ-Flow codebooks (CPC and CSPC)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    """Result of quantising N vectors: straight-through output, code indices and the commitment loss."""

    output: torch.Tensor
    codes: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code-usage histogram: the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients and EMA codebook updates (van den Oord et al.).

    The codebook is initialised from data with k-means++ (``initialize``) rather than random normals, and
    codes whose EMA usage falls below ``dead_fraction`` of the mean usage are restarted on random input
    vectors of the current batch, so no code stays dead.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, dead_fraction: float = 0.03):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.eps, self.dead_fraction = num_codes, dim, decay, eps, dead_fraction
        self.register_buffer("codebook", torch.zeros(num_codes, dim))
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, vectors: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means++ seeding of the codebook on (a sample of) ``vectors`` (N, dim)."""
        vectors = vectors.detach().reshape(-1, self.dim).float()
        if len(vectors) > 8192:
            vectors = vectors[torch.randperm(len(vectors), generator=generator)[:8192]]
        if len(vectors) < self.num_codes:  # too few distinct samples: jittered repeats, restarts spread them
            repeats = vectors[torch.randint(len(vectors), (self.num_codes - len(vectors),), generator=generator)]
            vectors = torch.cat([vectors, repeats + 1e-3 * torch.randn(repeats.shape, generator=generator)])
        chosen = [int(torch.randint(len(vectors), (1,), generator=generator))]
        distance = ((vectors - vectors[chosen[0]]) ** 2).sum(1)
        for _ in range(1, self.num_codes):
            probs = distance / distance.sum() if distance.sum() > 0 else torch.full_like(distance, 1 / len(distance))
            chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
            distance = torch.minimum(distance, ((vectors - vectors[chosen[-1]]) ** 2).sum(1))
        self.codebook.copy_(vectors[chosen].to(self.codebook))
        mean_count = len(vectors) / self.num_codes
        self.ema_count.fill_(mean_count)
        self.ema_sum.copy_(self.codebook * mean_count)
        self.initialized.fill_(True)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) for each row of ``vectors`` (N, dim)."""
        distances = (
            vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        )
        return distances.argmin(1)

    def forward(self, vectors: torch.Tensor) -> Quantized:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError(
                    "the codebook was never initialised: train the model (or load trained weights) first"
                )
            self.initialize(vectors)
        # in the codebook's precision under autocast too (train.precision: bfloat16): bfloat16 distances blur the
        # nearest-code choice, and the EMA update and dead-code restarts write into the codebook
        with torch.autocast(vectors.device.type, enabled=False):
            vectors = vectors.to(self.codebook.dtype)
            flat = vectors.reshape(-1, self.dim)
            indices = self.nearest(flat.detach())
            codes = F.embedding(indices, self.codebook).view_as(vectors).clone()
            if self.training:
                self._ema_update(flat.detach(), indices)
            commitment = F.mse_loss(vectors, codes.detach())
            output = vectors + (codes - vectors).detach()
        return Quantized(output, codes, indices.view(vectors.shape[:-1]), commitment)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        onehot = F.one_hot(indices, self.num_codes).to(flat.dtype)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        dead = self.ema_count < self.dead_fraction * self.ema_count.mean()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = flat[torch.randint(len(flat), (n_dead,), device=flat.device)]
        mean_count = self.ema_count.mean()
        self.codebook[dead] = picks
        self.ema_count[dead] = mean_count
        self.ema_sum[dead] = picks * mean_count
