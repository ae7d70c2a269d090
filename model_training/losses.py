"""Training loss: cross-entropy plus soft Dice over the foreground classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: How `soft_dice_loss` pools: over the whole batch, or per image and then averaged.
DICE_POOLING = ("batch", "image")


def _check_pooling(pooling: str) -> None:
    if pooling not in DICE_POOLING:
        raise ValueError(f"pooling must be one of {DICE_POOLING}, not {pooling!r}")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   include_background: bool = False, pooling: str = "batch") -> torch.Tensor:
    """1 − mean soft Dice over classes.

    Args:
        logits: `(N, C, H, W)` raw scores.
        target: `(N, H, W)` class indices.
        eps: smoothing, so that a class absent from both prediction and target scores 1.
        include_background: whether class 0 counts.
        pooling: "batch" sums each class over the whole batch before the ratio, so that large regions
            weigh most; "image" takes each image's Dice and averages them, as the evaluation's
            per-image mean does, so that a thin cytoplasm rim counts as much as a wide one.
    """
    _check_pooling(pooling)
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3) if pooling == "batch" else (2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (total + eps)      # (C,) or (N, C)
    if not include_background:
        dice = dice[..., 1:]
    return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """`ce_weight · CE + dice_weight · soft Dice`, the loss `wbc-train` optimises."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, dice_pooling: str = "batch") -> None:
        super().__init__()
        _check_pooling(dice_pooling)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.dice_pooling = dice_pooling

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target)
        dice = soft_dice_loss(logits, target, pooling=self.dice_pooling)
        return self.ce_weight * ce + self.dice_weight * dice
