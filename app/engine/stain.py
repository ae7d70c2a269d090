"""Stain normalisation at inference (Reinhard et al. 2001, "Color transfer between images"): each image
the network sees is shifted and scaled, channel by channel in CIELAB, to the mean and standard deviation
of a reference taken from the training set, so that a lab whose stain is paler, bluer or redder reaches
the network closer to the colours it was trained on.

The statistics are taken over the network's input (the model-sized window of one cell), the same way in
training, evaluation and the service: a window holds one leukocyte and its neighbourhood, as the training
crops do, so its statistics compare like with like. CIELAB is OpenCV's for float RGB in [0, 1] (L in
0–100, a and b about ±128), within 0.15 of scikit-image's `rgb2lab`.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from app.engine.contract import StainNormalization

#: A channel this flat (CIELAB units; a grey image's a and b spread only by rounding noise) has no spread
#: to scale: it is only shifted. Other gains are held to `_GAIN_RANGE`, so that a faded window's noise is
#: not blown up. The training crops' gains, resized to 224 px, lie within 0.63-1.94: neither bound
#: changes them.
_MIN_STD = 1.0
_GAIN_RANGE = (0.25, 4.0)


def lab_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel CIELAB mean and standard deviation `((3,), (3,))` of `(H, W, 3)` RGB (0–255)."""
    return _statistics(_to_lab(pixels))


def reference_statistics(images: Iterable[np.ndarray]) -> StainNormalization:
    """The reference of a training set: the mean over its images of each image's CIELAB mean and
    standard deviation (every image counts once, whatever its size)."""
    stats = [lab_statistics(image) for image in images]
    if not stats:
        raise ValueError("no images to take stain statistics from")
    means = np.mean([m for m, _ in stats], axis=0)
    stds = np.mean([s for _, s in stats], axis=0)
    return StainNormalization(method="reinhard", mean=tuple(map(float, means)),  # type: ignore[arg-type]
                              std=tuple(map(float, stds)))  # type: ignore[arg-type]


def normalize_stain(pixels: np.ndarray, reference: StainNormalization) -> np.ndarray:
    """`(H, W, 3)` RGB (0–255, any dtype) with its CIELAB statistics moved to `reference`'s; float32
    0–255, clipped to the displayable range."""
    lab = _to_lab(pixels)
    mean, std = _statistics(lab)
    gain = np.where(std > _MIN_STD, np.clip(np.asarray(reference.std) / np.maximum(std, _MIN_STD),
                                            *_GAIN_RANGE), 1.0)
    offset = np.asarray(reference.mean) - mean * gain
    lab *= gain.astype(np.float32)
    lab += offset.astype(np.float32)
    np.clip(lab[..., 0], 0.0, 100.0, out=lab[..., 0])
    rgb: np.ndarray = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32, copy=False)
    np.multiply(rgb, np.float32(255.0), out=rgb)
    return np.clip(rgb, 0.0, 255.0, out=rgb)


def _statistics(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = cv2.meanStdDev(lab)
    return mean.reshape(3), std.reshape(3)


def _to_lab(pixels: np.ndarray) -> np.ndarray:
    rgb = np.ascontiguousarray(pixels, dtype=np.float32) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
