"""CFLOW-AD (Gudovskiy et al.): one conditional normalizing flow per encoder stage over single feature vectors.

- Decoder of a stage: FrEIA SequenceINN of AllInOneBlocks with Linear subnets, conditioned on a 2-D sin/cos
  positional encoding of the vector's position (128-d).
- Training: the feature vectors of a batch of images are shuffled and fed in chunks (256 by default), one
  optimiser step per chunk; loss -logsigmoid of the per-dimension log-likelihood.
- Scoring: per stage p = exp(log p - c), upsampled and summed; anomaly map = stages - sum; image score = its
  max. The published code takes c as the maximum over the *test set*; here c is the maximum over the
  training set (``fit_statistics``), so no score depends on other test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock

from .registry import register_model
from .anomaly_map import add_map
from .base import AnomalyModel, Prediction, StepOutput
from .layers import LinearSubnet, positional_encoding_2d

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class CFlowConfig:
    in_channels: list[int] = field(default_factory=lambda: [24, 40, 112, 320])
    image_size: int = 256
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])  # pyramid stages (CFLOW's layers 2-4)
    coupling_blocks: int = 8
    pe_channels: int = 128
    clamp: float = 1.9
    chunk_size: int = 256  # feature vectors per optimiser step (paper N = 256)

    def __post_init__(self):
        bad = [s for s in self.stages if not 0 <= s < len(self.in_channels)]
        if not self.stages or bad:
            raise ValueError(f"model.cflow.stages: {self.stages} must name stages 0..{len(self.in_channels) - 1}")
        if self.chunk_size < 2:
            raise ValueError(f"model.cflow.chunk_size must be >= 2, got {self.chunk_size}")


def conditional_decoder(channels: int, cond_channels: int, blocks: int, clamp: float) -> SequenceINN:
    """CFLOW's decoder: AllInOneBlocks over vectors, Linear subnets, soft permutations, PE condition."""
    flow = SequenceINN(channels)
    for _ in range(blocks):
        flow.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(cond_channels,),
            subnet_constructor=LinearSubnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


def per_dim_log_likelihood(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """log p(x) / C for vectors (N, C) under a N(0, I) base: (-C/2 log 2pi - |z|^2 / 2 + log|det J|) / C."""
    channels = z.shape[1]
    return (-channels * _HALF_LOG_2PI - 0.5 * (z * z).sum(1) + logdet) / channels


class CFlow(AnomalyModel):
    def __init__(self, config: CFlowConfig):
        super().__init__()
        self.config = cfg = config
        self.decoders = torch.nn.ModuleList(
            conditional_decoder(cfg.in_channels[s], cfg.pe_channels, cfg.coupling_blocks, cfg.clamp) for s in cfg.stages
        )
        # per-stage max of the per-dimension log-likelihood over the training pixels: the score normaliser
        self.register_buffer("log_p_max", torch.zeros(len(cfg.stages)))

    def _vectors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> feature vectors (B*H*W, C) and their positional encodings (B*H*W, P)."""
        b, c, h, w = x.shape
        pe = positional_encoding_2d(self.config.pe_channels, h, w).to(x)
        vectors = x.permute(0, 2, 3, 1).reshape(-1, c)
        conds = pe.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(-1, pe.shape[0])
        return vectors, conds

    def log_likelihood(self, index: int, vectors: torch.Tensor, conds: torch.Tensor) -> torch.Tensor:
        z, logdet = self.decoders[index](vectors, c=[conds])
        return per_dim_log_likelihood(z, logdet)

    def training_chunks(self, features: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for index, stage in enumerate(self.config.stages):
            vectors, conds = self._vectors(features[stage])
            order = torch.randperm(len(vectors)).to(vectors.device)
            for ids in order.split(self.config.chunk_size):
                yield index, vectors[ids], conds[ids]

    def training_step(self, chunk: tuple[int, torch.Tensor, torch.Tensor]) -> StepOutput:
        index, vectors, conds = chunk
        log_p = self.log_likelihood(index, vectors, conds)
        loss = -F.logsigmoid(log_p).mean()
        return StepOutput(loss, {f"nll_stage{self.config.stages[index]}": -log_p.mean()})

    def log_p_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage the per-dimension log-likelihood of every position, (B, H, W)."""
        maps = []
        for index, stage in enumerate(self.config.stages):
            b, _, h, w = features[stage].shape
            maps.append(self.log_likelihood(index, *self._vectors(features[stage])).reshape(b, h, w))
        return maps

    def fit_statistics(self, batches) -> None:
        peak = torch.full_like(self.log_p_max, -torch.inf)
        for features in batches:
            batch_max = torch.stack([m.amax() for m in self.log_p_maps(features)])
            peak = torch.maximum(peak, batch_max)
        self.log_p_max.copy_(peak)

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> Prediction:
        anomaly_map = add_map(self.log_p_maps(features), self.config.image_size, self.log_p_max)
        return Prediction(anomaly_map.flatten(1).amax(1), anomaly_map)


@register_model("cflow", CFlowConfig)
def build_cflow(config: CFlowConfig) -> CFlow:
    return CFlow(config)
