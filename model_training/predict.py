"""Prediction exactly as the service does it: the engine's transform in, its label resize out; whole
image (v1) or the primary cell of the engine's per-cell path (finder, windows, stitching); with the
engine's test-time augmentation (`app.engine.augment`) when asked."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from app.engine.augment import Mode, augmented
from app.engine.cells import Infer, measure_cells, primary_cell, segment_cells
from app.engine.labels import labels_at_size
from app.engine.transform import InputTransform


def _infer(model: nn.Module, device: torch.device | str, tta: Mode) -> Infer:
    def run(x: np.ndarray) -> tuple[np.ndarray, float]:
        return model(torch.from_numpy(x).to(device)).float().cpu().numpy(), 0.0

    return augmented(run, tta)


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, transform: InputTransform,
                   device: torch.device | str = "cpu", tta: Mode = "none") -> np.ndarray:
    """Class indices `(H, W)` uint8 for one `(H, W, 3)` uint8 image.

    Args:
        model: returns `(N, C, h, w)` logits in the API's class order.
        image: the RGB image.
        transform: the engine's preprocessing of the model (`InputTransform`).
        device: where the model runs.
        tta: the engine's test-time augmentation.
    """
    model.eval()
    logits = _infer(model, device, tta)(transform(image)[None])[0][0]
    return labels_at_size(logits, image.shape[:2])


@torch.no_grad()
def predict_primary_cell(model: nn.Module, image: np.ndarray, transform: InputTransform,
                         device: torch.device | str = "cpu", tta: Mode = "none") -> np.ndarray:
    """Class indices `(H, W)` uint8 of the image's primary cell alone (API.md: the cell under the image
    centre, else the nearest large one), all zero when the service would find no leukocyte.

    Args: as `predict_labels`.
    """
    model.eval()
    stitched, _ = segment_cells(image, transform, _infer(model, device, tta))
    primary = primary_cell(measure_cells(stitched, None), stitched.instances)
    if primary is None:
        return np.zeros(image.shape[:2], np.uint8)
    return np.where(stitched.instances == primary, stitched.labels, 0).astype(np.uint8)
