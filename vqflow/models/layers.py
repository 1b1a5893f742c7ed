"""Small building blocks shared by the models."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool (B, C, H, W) to ``size``: a plain average pool when the sizes divide (the pyramid's always do;
    an ONNX trace of adaptive pooling needs shapes it does not keep), adaptive pooling otherwise."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if height % size[0] or width % size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.avg_pool2d(x, (height // size[0], width // size[1]))


@lru_cache(maxsize=32)
def _positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    if channels % 4:
        raise ValueError(f"positional encoding channels must be a multiple of 4, got {channels}")
    quarter = channels // 4
    freq = torch.exp(torch.arange(quarter, dtype=torch.float64) * -(math.log(10000.0) / quarter))
    ys = torch.arange(height, dtype=torch.float64)[:, None] * freq[None]
    xs = torch.arange(width, dtype=torch.float64)[:, None] * freq[None]
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    pe[0:quarter] = torch.sin(xs).t()[:, None, :].expand(-1, height, -1)
    pe[quarter : 2 * quarter] = torch.cos(xs).t()[:, None, :].expand(-1, height, -1)
    pe[2 * quarter : 3 * quarter] = torch.sin(ys).t()[:, :, None].expand(-1, -1, width)
    pe[3 * quarter :] = torch.cos(ys).t()[:, :, None].expand(-1, -1, width)
    return pe.float()


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sin/cos positional encoding (channels, height, width): half the channels for x, half for y."""
    return _positional_encoding(channels, height, width).clone()


class ConvSubnet(nn.Module):
    """Coupling subnet of MSFlow: conv k x k -> channel LayerNorm -> ReLU -> conv k x k (MSFlow: k = 3), the last
    layer zero-initialised. ``separable``: each k x k convolution is a depthwise k x k followed by a pointwise 1 x 1
    (MobileNet's factorisation): the same receptive field for about 1/k^2 of the multiply-adds."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int = 3, separable: bool = False):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"a coupling subnet's kernel size must be odd and >= 1, got {kernel_size}")

        def conv(cin: int, cout: int) -> nn.Module:
            if separable and kernel_size > 1:
                return nn.Sequential(
                    nn.Conv2d(cin, cin, kernel_size, padding=kernel_size // 2, groups=cin), nn.Conv2d(cin, cout, 1)
                )
            return nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)

        self.net = nn.Sequential(
            conv(channels_in, channels_in),
            LayerNorm2d(channels_in),
            nn.ReLU(inplace=True),
            conv(channels_in, channels_out),
        )
        last = self.net[-1][-1] if isinstance(self.net[-1], nn.Sequential) else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearSubnet(nn.Module):
    """Coupling subnet of CFLOW-AD: Linear(in, 2 in) -> ReLU -> Linear."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels_in, 2 * channels_in), nn.ReLU(), nn.Linear(2 * channels_in, channels_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU: the CPC projection of the pooled top-stage feature."""
    return nn.Sequential(
        nn.Linear(channels_in, channels_out),
        nn.BatchNorm1d(channels_out),
        nn.ReLU(inplace=True),
        nn.Linear(channels_out, channels_out),
        nn.BatchNorm1d(channels_out),
        nn.ReLU(inplace=True),
    )


def conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    """conv1x1-BN-ReLU-conv1x1-BN-ReLU: the CSPC per-pixel pattern projection."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 1),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels_out, channels_out, 1),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )
