"""MSFlow's flows on FrEIA 0.2: one conditional AllInOneBlock sequence per scale, then a fusion coupling."""

from __future__ import annotations

from functools import partial
from itertools import cycle, islice
from typing import Sequence

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from .layers import ConvSubnet, pool_to


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """MSFlow's smooth clamp of log-scales to (-clamp, clamp): clamp * 2/pi * atan(s / clamp)."""
    return clamp * 0.636 * torch.atan(s / clamp)


def parallel_flow(
    channels: int,
    height: int,
    width: int,
    blocks: int,
    cond_channels: int,
    clamp: float,
    kernel_sizes: Sequence[int] = (3,),
    separable: bool = False,
) -> SequenceINN:
    """A SequenceINN of AllInOneBlocks with conv subnets, conditioned when ``cond_channels`` > 0; block i's subnet
    convolutions are ``kernel_sizes[i % len(kernel_sizes)]`` wide ((3, 1) alternates 3 x 3 and 1 x 1, as FastFlow),
    depthwise-separable with ``separable``."""
    flow = SequenceINN(channels, height, width)
    for kernel_size in islice(cycle(kernel_sizes), blocks):
        flow.append(
            AllInOneBlock,
            cond=0 if cond_channels else None,
            cond_shape=(cond_channels, height, width) if cond_channels else None,
            subnet_constructor=partial(ConvSubnet, kernel_size=kernel_size, separable=separable),
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
    return flow


class FusionCoupling(nn.Module):
    """An invertible coupling that mixes the scales.

    Every scale is split into halves (a, b). The a-halves of all scales are pooled to the coarsest size,
    concatenated (with an optional per-image condition vector), sent through a conv subnet, split per scale,
    upsampled, and transform the b-halves affinely (soft-clamped log-scales). A second pass swaps the
    roles, so every channel of every scale is conditioned on all the others.
    """

    def __init__(
        self,
        channels: Sequence[int],
        cond_channels: int = 0,
        clamp: float = 1.9,
        kernel_size: int = 3,
        separable: bool = False,
    ):
        super().__init__()
        self.channels = list(channels)
        self.clamp = clamp
        self.cond_channels = cond_channels
        passive = [c - c // 2 for c in self.channels]
        active = [c // 2 for c in self.channels]
        self.halves = [(passive, active), (active, passive)]
        self.subnets = nn.ModuleList(
            ConvSubnet(sum(src) + cond_channels, 2 * sum(dst), kernel_size, separable) for src, dst in self.halves
        )

    def _split(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        parts = [torch.split(x, [int(x.shape[1]) - int(x.shape[1]) // 2, int(x.shape[1]) // 2], 1) for x in xs]
        return [p[0] for p in parts], [p[1] for p in parts]

    def _coefficients(
        self, step: int, sources: list[torch.Tensor], cond: torch.Tensor | None, targets: list[torch.Tensor]
    ):
        # plain ints: channel counts and map sizes are fixed by the image size, so an ONNX trace keeps them constant
        size = tuple(int(v) for v in sources[-1].shape[-2:])
        pooled = [pool_to(s, size) for s in sources]
        if self.cond_channels:
            pooled.append(cond[:, :, None, None].expand(-1, -1, *size))
        out = self.subnets[step](torch.cat(pooled, 1))
        sizes = [2 * int(t.shape[1]) for t in targets]
        coefficients = []
        for chunk, target in zip(torch.split(out, sizes, 1), targets):
            chunk = F.interpolate(chunk, size=tuple(int(v) for v in target.shape[-2:]), mode="nearest")
            log_scale, shift = chunk.chunk(2, 1)
            coefficients.append((soft_clamp(log_scale, self.clamp), shift))
        return coefficients

    def forward(self, xs: Sequence[torch.Tensor], cond: torch.Tensor | None = None, rev: bool = False):
        a, b = self._split(xs)
        logdet = xs[0].new_zeros(xs[0].shape[0])
        steps = (1, 0) if rev else (0, 1)
        for step in steps:
            sources, targets = (a, b) if step == 0 else (b, a)
            coefficients = self._coefficients(step, sources, cond, targets)
            updated = []
            for t, (s, shift) in zip(targets, coefficients):
                updated.append((t - shift) * torch.exp(-s) if rev else t * torch.exp(s) + shift)
                logdet = logdet + (-1 if rev else 1) * s.sum((1, 2, 3))
            if step == 0:
                b = updated
            else:
                a = updated
        return [torch.cat([x1, x2], 1) for x1, x2 in zip(a, b)], logdet
