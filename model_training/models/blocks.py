"""Building blocks shared by every architecture, so the models differ only in their attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by batch norm and ReLU.

    Args:
        in_channels: channels of the input `(N, C_in, H, W)`.
        out_channels: channels of the output `(N, C_out, H, W)`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al., 2018): reweight every pixel of a feature map.

    Per pixel the channel mean and channel max are stacked into a 2-channel map, a k×k convolution
    and a sigmoid turn it into a weight in (0, 1), and the features are multiplied by it. It costs
    2·k² + 1 parameters, whatever the width.

    Args:
        kernel_size: side of the square convolution (odd).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attention map `(N, 1, H, W)` for features `(N, C, H, W)`."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., 2018): the decoder's coarser signal gates a skip.

    Args:
        skip_channels: channels of the skip features `(N, C_s, H, W)`.
        gate_channels: channels of the gating signal `(N, C_g, H, W)` (already upsampled).
        inter_channels: width of the joint embedding.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.skip = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1, bias=False),
                                  nn.BatchNorm2d(inter_channels))
        self.gate = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1, bias=False),
                                  nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inter_channels, 1, 1),
                                 nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(self.skip(skip) + self.gate(gate))


class UpBlock(nn.Module):
    """Upsample ×2, optionally reweight the skip, concatenate, and convolve.

    `skip_attention` is one of None, "spatial" (CBAM spatial attention on the skip) or "gate"
    (an Oktay attention gate driven by the upsampled decoder features).

    Args:
        in_channels: channels coming up from the coarser level.
        skip_channels: channels of the encoder skip at this level.
        out_channels: channels after the block.
        skip_attention: which attention, if any, filters the skip before concatenation.
        kernel_size: kernel of the spatial attention.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 skip_attention: str | None = None, kernel_size: int = 7) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.skip_attention = skip_attention
        self.attention: nn.Module | None = None
        if skip_attention == "spatial":
            self.attention = SpatialAttention(kernel_size)
        elif skip_attention == "gate":
            self.attention = AttentionGate(skip_channels, in_channels // 2, max(skip_channels // 2, 1))
        elif skip_attention is not None:
            raise ValueError(f"unknown skip_attention {skip_attention!r}")
        self.conv = ConvBlock(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.skip_attention == "spatial":
            skip = self.attention(skip)  # type: ignore[misc]
        elif self.skip_attention == "gate":
            skip = self.attention(skip, x)  # type: ignore[misc]
        return self.conv(torch.cat([x, skip], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad `(N, C, H, W)` on the bottom and right so H and W divide by `multiple`.

    Returns:
        The padded tensor and the original `(H, W)`, for `crop_to`.
    """
    h, w = x.shape[-2:]
    # Always pad (possibly by zero): a branch on the size would freeze it in an exported graph.
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate"), (h, w)
