"""medfed's SliceNet: small enough to train with DP-SGD on a hospital CPU; GroupNorm only (Opacus-safe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int, groups: int) -> list[nn.Module]:
    """Conv, GroupNorm, ReLU; neither the conv nor the norm has per-channel bias or scale.

    DP-SGD computes a per-patient gradient for every trained tensor; Opacus' GroupNorm
    sampler recomputes the normalisation to get one. Dropping those few parameters (224
    scales and shifts, 112 biases, 1.4% of the model) removes that work from every step,
    and the next conv layer can still scale and mix the normalised channels.
    """
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout, affine=False), nn.ReLU()]


def _gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


class BlobFilters(nn.Module):
    """Fixed (not trained) multi-scale difference-of-Gaussians filters plus the image itself.

    Hand-crafted front ends make DP-SGD far more sample-efficient: noise is added only
    to the few trainable weights behind them (Tramèr & Boneh, ICLR 2021, "Differentially
    private learning needs better features"). DoG filters respond to round, bright
    findings of a given size, such as nodules.
    """

    def __init__(self, scales: tuple[float, ...] = (1.0, 1.5, 2.5)) -> None:
        super().__init__()
        self.radius = int(3 * max(scales) * 1.6) + 1
        # Gaussians are separable: one horizontal and one vertical 1-D pass per sigma
        sigmas = [t for s in scales for t in (s, 1.6 * s)]
        self.kernels: torch.Tensor
        self.register_buffer("kernels", torch.stack([_gaussian_1d(t, self.radius) for t in sigmas])[:, None, None, :],
                             persistent=False)
        self.out_channels = 1 + len(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.kernels.shape[0]
        rows = F.conv2d(x, self.kernels, padding=(0, self.radius))
        blurred = F.conv2d(rows, self.kernels.transpose(2, 3), padding=(self.radius, 0), groups=n)
        dog = blurred[:, 0::2] - blurred[:, 1::2]
        return torch.cat([x, 8.0 * dog], dim=1)  # intensities + rescaled DoG responses (they are small)


class SliceNet(nn.Module):
    """Fixed blob filters, 2x average pooling, four conv blocks with GroupNorm, global max pool.

    Global max pooling suits small-finding detection (a nodule anywhere in the slice).
    Pooling the smooth filter responses before the first trained layer quarters the
    cost of every per-sample gradient DP-SGD computes.
    """

    def __init__(self, width: int = 16, blob_filters: bool = True, outputs: int = 1) -> None:
        super().__init__()
        w = width
        front = [BlobFilters()] if blob_filters else []
        cin = front[0].out_channels if front else 1
        self.features = nn.Sequential(
            *front, nn.AvgPool2d(2),
            *_block(cin, w, 4), nn.MaxPool2d(2),
            *_block(w, 2 * w, 4), nn.MaxPool2d(2),
            *_block(2 * w, 2 * w, 8),
            *_block(2 * w, 2 * w, 8),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(2 * w, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inputs are windowed to [0, 1]; centre them so the first layer starts balanced
        out = self.head(self.features(2.0 * x - 1.0).flatten(1))
        return out.squeeze(1) if out.shape[1] == 1 else out
