"""Whole-image prediction exactly as the service does it: the engine's transform in, its label resize out."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from app.engine.labels import labels_at_size
from app.engine.transform import InputTransform


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, transform: InputTransform,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Class indices `(H, W)` uint8 for one `(H, W, 3)` uint8 image.

    Args:
        model: returns `(N, C, h, w)` logits in the API's class order.
        image: the RGB image.
        transform: the engine's preprocessing of the model (`InputTransform`).
        device: where the model runs.
    """
    model.eval()
    x = torch.from_numpy(transform(image))[None].to(device)
    logits = model(x).float()[0].cpu().numpy()
    return labels_at_size(logits, image.shape[:2])
