"""Training loss: cross-entropy plus soft Dice over the foreground classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   include_background: bool = False) -> torch.Tensor:
    """1 − mean soft Dice over classes, pooled over the batch.

    Args:
        logits: `(N, C, H, W)` raw scores.
        target: `(N, H, W)` class indices.
        eps: smoothing, so that a class absent from both prediction and target scores 1.
        include_background: whether class 0 counts.
    """
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (total + eps)
    if not include_background:
        dice = dice[1:]
    return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """`ce_weight · CE + dice_weight · soft Dice`, the loss `wbc-train` optimises."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target)
