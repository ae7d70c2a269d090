"""A drawn smear-like crop with its exact mask, needing only numpy and Pillow: the engine checks a
quantized model against its fp32 original on such crops before serving it (`session`), and training
and the tests draw their generated data with it (`model_training.synthetic`)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
          angle: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def make_sample(size: int | tuple[int, int] = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate one crop centred on a leukocyte.

    Pink red cells with pale centres lie around a leukocyte whose paler cytoplasm holds a round or
    lobed purple nucleus; stain, brightness, noise and blur vary with `seed`.

    Args:
        size: side, or `(height, width)`, in pixels.
        seed: everything random follows from it.

    Returns:
        image `(H, W, 3)` uint8 RGB and label `(H, W)` uint8 (0 background, 1 cytoplasm, 2 nucleus).
    """
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    stain = rng.uniform(0.85, 1.15, size=3)
    background = np.array([236, 222, 205]) * rng.uniform(0.9, 1.05)
    image = np.broadcast_to(background, (h, w, 3)).astype(np.float32).copy()

    for _ in range(rng.integers(3, 9)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.12, 0.2) * side
        red = disc(yy, xx, cy, cx, r, r * rng.uniform(0.85, 1.15), rng.uniform(0, np.pi))
        pale = disc(yy, xx, cy, cx, r * 0.45, r * 0.45)
        image[red] = np.array([214, 140, 150]) * rng.uniform(0.9, 1.1)
        image[red & pale] = np.array([226, 170, 175])

    cy, cx = h / 2 + rng.uniform(-0.05, 0.05) * h, w / 2 + rng.uniform(-0.05, 0.05) * w
    r_cell = rng.uniform(0.25, 0.36) * side
    cell = disc(yy, xx, cy, cx, r_cell, r_cell * rng.uniform(0.85, 1.15), rng.uniform(0, np.pi))
    nucleus = np.zeros_like(cell)
    if rng.random() < 0.5:  # round, lymphocyte-like
        r_n = r_cell * rng.uniform(0.5, 0.75)
        nucleus = disc(yy, xx, cy, cx, r_n, r_n * rng.uniform(0.8, 1.1), rng.uniform(0, np.pi))
    else:  # lobed, neutrophil-like
        for _ in range(rng.integers(2, 5)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.45) * r_cell
            r_l = r_cell * rng.uniform(0.22, 0.33)
            nucleus |= disc(yy, xx, cy + d * np.sin(a), cx + d * np.cos(a), r_l, r_l * 1.2, a)
    nucleus &= cell
    image[cell] = np.array([205, 190, 225]) * rng.uniform(0.9, 1.08)
    image[nucleus] = np.array([110, 60, 150]) * rng.uniform(0.8, 1.15)

    shaded = image * stain * rng.uniform(0.85, 1.1)
    shaded += rng.normal(0, rng.uniform(2, 8), shaded.shape)
    pil = Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    label = np.zeros((h, w), np.uint8)
    label[cell] = 1
    label[nucleus] = 2
    return np.asarray(pil), label
