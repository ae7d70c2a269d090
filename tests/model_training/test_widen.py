"""Net2WiderNet: a checkpoint widened to twice its channels computes what it computed, and trains."""

from __future__ import annotations

import pytest
import torch

from model_training.models import build_model, count_parameters
from model_training.widen import check, widen_checkpoint, widen_model


def _trained(name: str, base: int = 4, depth: int = 2) -> torch.nn.Module:
    """A small model whose BatchNorm statistics and weights are no longer at their initial values."""
    torch.manual_seed(1)
    model = build_model(name, base_channels=base, depth=depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("name", ["attention_unet", "unet", "attention_gate_unet"])
def test_widened_model_computes_the_same_logits(name: str) -> None:
    old = _trained(name)
    new = build_model(name, base_channels=8, depth=2)
    before = check(old, new)
    widen_model(old, new)
    assert before > 1e-2
    assert check(old, new, size=48) < 1e-4
    assert count_parameters(new) > 3 * count_parameters(old)


def test_copies_grow_apart_in_training() -> None:
    old = _trained("attention_unet")
    new = build_model("attention_unet", base_channels=8, depth=2)
    widen_model(old, new)
    new.train()
    optimizer = torch.optim.SGD(new.parameters(), lr=0.05)
    loss = new(torch.randn(4, 3, 32, 32)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    weight = new.stem[3].weight  # second convolution of the first level: 8 outputs from 8 inputs
    assert not torch.allclose(weight[:4], weight[4:])


def test_only_doubling_is_supported() -> None:
    old = _trained("unet")
    with pytest.raises(ValueError, match="double"):
        widen_model(old, build_model("unet", base_channels=12, depth=2))


def test_widened_checkpoint_starts_a_wider_run(tmp_path) -> None:
    old = _trained("attention_unet")
    config = {"model": "attention_unet", "base_channels": 4, "depth": 2, "out": "runs/x",
              "stain_reference": None}
    torch.save({"model": old.state_dict(), "config": config, "epoch": 3, "best": 0.5}, tmp_path / "best.pt")
    wide = widen_checkpoint(tmp_path / "best.pt", tmp_path / "wide.pt")
    assert wide["config"]["base_channels"] == 8
    assert wide["config"]["widened_from"] == str(tmp_path / "best.pt")
    reloaded = build_model("attention_unet", base_channels=8, depth=2)
    reloaded.load_state_dict(torch.load(tmp_path / "wide.pt", weights_only=False)["model"])
    assert check(old, reloaded) < 1e-4
