"""The architectures: any input size, gradients everywhere, a registry, attention as the only difference."""

from __future__ import annotations

import pytest
import torch

from model_training import NUM_CLASSES
from model_training.models import MODELS, AttentionUNet, UNet, build_model, count_parameters
from model_training.models.blocks import SpatialAttention

TINY = {"base_channels": 4, "depth": 2}


@pytest.mark.parametrize("name", sorted(MODELS), ids=sorted(MODELS))
def test_model_keeps_odd_input_size_and_backpropagates_to_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    x = torch.randn(1, 3, 117, 101)

    logits = model(x)
    logits.square().mean().backward()

    assert logits.shape == (1, NUM_CLASSES, 117, 101)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("size", [(64, 64), (33, 70), (1, 1)], ids=["square", "odd", "single-pixel"])
def test_model_output_matches_input_size_in_eval_mode(size: tuple[int, int]) -> None:
    model = build_model("attention_unet", **TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, NUM_CLASSES, *size)


def test_build_model_rejects_unknown_name_listing_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*attention_unet.*unet"):
        build_model("resnet")


def test_build_model_returns_the_registered_class() -> None:
    assert type(build_model("unet", **TINY)) is UNet
    assert type(build_model("attention_unet", **TINY)) is AttentionUNet


@pytest.mark.parametrize("depth", [2, 3], ids=["depth2", "depth3"])
def test_attention_unet_differs_from_unet_only_by_its_attention_modules(depth: int) -> None:
    plain = dict(build_model("unet", base_channels=4, depth=depth).named_parameters())
    attention = dict(build_model("attention_unet", base_channels=4, depth=depth).named_parameters())

    added = set(attention) - set(plain)

    assert set(plain) <= set(attention)
    assert all(plain[n].shape == attention[n].shape for n in plain)
    assert added and all("attention" in n for n in added)
    # One 7×7 spatial attention (2·49 + 1 parameters) per skip and one on the bottleneck.
    assert count_parameters(build_model("attention_unet", base_channels=4, depth=depth)) - sum(
        p.numel() for p in plain.values()) == 99 * (depth + 1)


def test_spatial_attention_weights_lie_in_unit_interval_and_scale_features() -> None:
    attention = SpatialAttention(7)
    x = torch.randn(2, 5, 9, 11)

    weights = attention.weights(x)

    assert weights.shape == (2, 1, 9, 11)
    assert bool(((weights > 0) & (weights < 1)).all())
    torch.testing.assert_close(attention(x), x * weights)


def test_spatial_attention_rejects_an_even_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(4)
