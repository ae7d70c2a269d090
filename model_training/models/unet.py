"""A plain U-Net (Ronneberger et al., 2015) with configurable width, depth and skip attention."""

from __future__ import annotations

import torch
from torch import nn

from model_training import NUM_CLASSES
from model_training.models.blocks import ConvBlock, SpatialAttention, UpBlock, pad_to_multiple


class UNet(nn.Module):
    """Encoder-decoder with skip connections; the baseline every variant is compared with.

    Args:
        in_channels: image channels (3 for RGB).
        num_classes: output classes (background, cytoplasm, nucleus).
        base_channels: width of the first level; each level below doubles it.
        depth: number of downsampling steps; inputs of any size are padded to a multiple of 2**depth
            and the logits cropped back, so output `(N, num_classes, H, W)` matches input `(N, C, H, W)`.
        skip_attention: None, "spatial" or "gate"; see `UpBlock`.
        bottleneck_attention: apply spatial attention to the bottleneck features.
        kernel_size: kernel of the spatial attention.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = NUM_CLASSES, base_channels: int = 16,
                 depth: int = 4, skip_attention: str | None = None,
                 bottleneck_attention: bool = False, kernel_size: int = 7) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.stem = ConvBlock(in_channels, widths[0])
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[i], widths[i + 1])) for i in range(depth)
        )
        self.bottleneck_attention = SpatialAttention(kernel_size) if bottleneck_attention else None
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], skip_attention, kernel_size)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 2**self.depth)
        skips = [self.stem(x)]
        for down in self.encoder:
            skips.append(down(skips[-1]))
        x = skips.pop()
        if self.bottleneck_attention is not None:
            x = self.bottleneck_attention(x)
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)[..., :h, :w]
