"""U-Nets with attention in the encoder-decoder: CBAM spatial attention, or Oktay attention gates."""

from __future__ import annotations

from typing import Any

from model_training.models.unet import UNet


class AttentionUNet(UNet):
    """U-Net with CBAM spatial attention on every skip connection and on the bottleneck.

    Where and why: each encoder skip is reweighted per pixel before it is concatenated into the
    decoder, so the decoder receives the high-resolution detail of the leukocyte and less of the red
    cells and background around it (the skips are where the plain U-Net passes clutter straight to
    the output). The bottleneck is reweighted too, where the receptive field covers the whole cell
    and the map can single out the leukocyte among its neighbours. Everything else is the plain
    `UNet`, layer for layer, so a comparison measures the attention alone (it adds 99 parameters per
    attention at k=7).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(skip_attention="spatial", bottleneck_attention=True, **kwargs)


class AttentionGateUNet(UNet):
    """U-Net with additive attention gates on the skips (Oktay et al., 2018, "Attention U-Net")."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(skip_attention="gate", **kwargs)
