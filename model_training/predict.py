"""Whole-image prediction exactly as the service does it: resize in, logits back to full size, argmax."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_training.transforms import normalize, resize_image, to_tensor


@torch.no_grad()
def predict_logits(model: nn.Module, image: np.ndarray, input_size: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits `(C, H, W)` at the image's own size for one `(H, W, 3)` uint8 image."""
    model.eval()
    h, w = image.shape[:2]
    x = normalize(resize_image(to_tensor(image), input_size))[None].to(device)
    logits = model(x).float()
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0].cpu()


def predict_labels(model: nn.Module, image: np.ndarray, input_size: int,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Class indices `(H, W)` uint8 for one `(H, W, 3)` uint8 image."""
    return predict_logits(model, image, input_size, device).argmax(0).numpy().astype(np.uint8)
