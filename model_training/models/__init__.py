"""Model registry: `build_model(name, **kwargs)` over every architecture the project trains."""

from __future__ import annotations

from typing import Any

from torch import nn

from model_training.models.attention_unet import AttentionGateUNet, AttentionUNet
from model_training.models.blocks import AttentionGate, SpatialAttention
from model_training.models.unet import UNet

MODELS: dict[str, type[UNet]] = {
    "unet": UNet,
    "attention_unet": AttentionUNet,
    "attention_gate_unet": AttentionGateUNet,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture.

    Args:
        name: a key of `MODELS`.
        **kwargs: passed to the model (base_channels, depth, kernel_size, ...).

    Raises:
        ValueError: for an unknown name, listing the choices.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "AttentionGate", "AttentionGateUNet", "AttentionUNet", "SpatialAttention",
           "UNet", "build_model", "count_parameters"]
