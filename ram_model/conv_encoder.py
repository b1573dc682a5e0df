"""A small conv image encoder with RAM's token layout: the tiny preset's option (`RAMConfig.image_encoder:
conv`), a stand-in for the pretrained Swin where a model must learn shapes in CPU minutes.

    image (B,3,S,S) ─► conv-BN-ReLU blocks, a 2x2 max-pool after each but the last ─► (B, C, S/2^(n-1), ...)
                    ─► [mean of the tokens ; tokens]  (B, 1 + T, C), as SwinTransformer returns

Measured on the demo's generated worlds (flows/demo_assets/README.md): at 64 px the tiny Swin ends with 2x2
tokens and learns shape tags slowly (held-out AP 0.26 after 2,000 steps); this encoder keeps an 8x8 grid
and reached 0.60 in 1,300 steps at about the same cost per step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_blocks(channels: Sequence[int], pool_last: bool = True) -> nn.Sequential:
    """conv3x3 (no bias) - BatchNorm - ReLU per channel count, each followed by a 2x2 max-pool (the last
    one only when `pool_last`). Shared by the crop embedder and this encoder."""
    layers: list[nn.Module] = []
    cin = 3
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if pool_last or i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = c
    return nn.Sequential(*layers)


class ConvImageEncoder(nn.Module):
    """(B, 3, S, S) → (B, 1 + (S/2^(n-1))², channels[-1]): the mean token first, then the grid's tokens."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"ConvImageEncoder: channels must be positive counts, got {list(channels)}")
        self.features = conv_blocks(channels, pool_last=False)
        self.out_dim = int(channels[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.features(images).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
