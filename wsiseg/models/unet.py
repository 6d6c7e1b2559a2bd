"""The modified U-Net of seed 000 (Kasturi et al.): a U-Net with BatchNorm after every 3x3 conv.

Input: float tensor (N, 3, H, W), normalised RGB. Output: logits (N, C, H, W).
H and W must be multiples of 2**depth (16 by default); the engine pads tiles to satisfy it.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetBN(nn.Module):
    """U-Net with BatchNorm; `base` channels at full resolution, doubled at each of `depth` levels."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 16, depth: int = 4):
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([_double_conv(in_channels, chans[0])])
        self.down.extend(_double_conv(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            _double_conv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
