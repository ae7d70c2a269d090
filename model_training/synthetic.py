"""Generated smear-like crops with exact masks: for tests and smoke runs, never for shipped models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.engine.smear import make_sample
from model_training.data import Sample


def make_samples(count: int, size: int = 128, seed: int = 0, sources: int = 2) -> list[Sample]:
    """`count` synthetic samples, spread over `sources` pseudo-sources (`synthetic0`, ...)."""
    return [Sample(*make_sample(size, seed * 100_003 + i), source=f"synthetic{i % sources}",
                   name=f"{i:04d}") for i in range(count)]


def write_folder(folder: Path | str, count: int, size: int = 96, seed: int = 0,
                 mask_levels: tuple[int, int, int] = (0, 128, 255)) -> Path:
    """Write `count` samples as `folder/images/*.png` + `folder/masks/*.png` grey-level masks."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    levels = np.asarray(mask_levels, np.uint8)
    for i in range(count):
        image, label = make_sample(size, seed * 100_003 + i)
        Image.fromarray(image).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(levels[label]).save(folder / "masks" / f"{i:03d}.png")
    return folder


#: Colours of `make_field`: background, red cell and its pale centre, cytoplasm, nucleus, platelet.
FIELD_COLOURS = {"background": (236, 222, 205), "red": (214, 140, 150), "red_centre": (226, 172, 176),
                 "cytoplasm": (205, 188, 218), "nucleus": (105, 70, 170), "platelet": (150, 120, 190)}


def lobes(cx: int, cy: int, count: int = 3, spread: int = 18, radius: int = 11) -> list[tuple[int, int, int]]:
    """Circles (x, y, r) of a multi-lobed (neutrophil-like) nucleus around (cx, cy)."""
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False) + 0.4
    return [(int(cx + spread * np.cos(a)), int(cy + spread * np.sin(a)), radius) for a in angles]


FieldCell = tuple[int, int, int, list[tuple[int, int, int]]]
#: Three leukocytes on a 640×480 field of view (`make_field`'s size), the third cut by the right edge.
THREE_CELLS: list[FieldCell] = [(170, 150, 40, lobes(170, 150)), (460, 300, 36, [(460, 300, 22)]),
                                (620, 90, 40, [(622, 90, 22)])]


def packed_cells(side: int, radius: int = 30) -> list[FieldCell]:
    """Three-lobed leukocytes of `radius` packed on a grid over a `side` × `side` field, 10 px apart: a
    field in which every cell is a finder candidate (`make_field(packed_cells(...), ...)`)."""
    steps = range(radius + 5, side - radius, 2 * radius + 10)
    return [(x, y, radius, lobes(x, y, 3, radius // 3, radius // 3)) for y in steps for x in steps]


def make_field(cells: list[FieldCell], size: tuple[int, int] = (480, 640), seed: int = 0,
               red_cells: int = 28, platelets: int = 4,
               rbc_radius: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smear field of view: red cells with pale centres, platelets, then leukocytes on top.

    Args:
        cells: per leukocyte `(cx, cy, cell_radius, nucleus circles [(x, y, r), ...])`.
        size: (height, width).

    Returns:
        image `(H, W, 3)` uint8 RGB, labels `(H, W)` uint8 (0 background, 1 cytoplasm, 2 nucleus) and
        instances `(H, W)` uint16 (leukocyte i is i + 1, in the order given).
    """
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    image = np.empty((h, w, 3), np.uint8)
    image[:] = FIELD_COLOURS["background"]
    labels = np.zeros((h, w), np.uint8)
    instances = np.zeros((h, w), np.uint16)
    for _ in range(red_cells):
        x, y, r = int(rng.uniform(0, w)), int(rng.uniform(0, h)), int(rbc_radius * rng.uniform(0.9, 1.1))
        cv2.circle(image, (x, y), r, FIELD_COLOURS["red"], -1)
        cv2.circle(image, (x, y), r // 2, FIELD_COLOURS["red_centre"], -1)
    for _ in range(platelets):
        cv2.circle(image, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), 4, FIELD_COLOURS["platelet"], -1)
    for index, (cx, cy, radius, nuclei) in enumerate(cells, start=1):
        cv2.circle(image, (cx, cy), radius, FIELD_COLOURS["cytoplasm"], -1)
        cv2.circle(labels, (cx, cy), radius, 1, -1)
        cv2.circle(instances, (cx, cy), radius, index, -1)
        for x, y, r in nuclei:
            cv2.circle(image, (x, y), r, FIELD_COLOURS["nucleus"], -1)
            cv2.circle(labels, (x, y), r, 2, -1)
    image = cv2.GaussianBlur(image, (5, 5), 1.0)
    noisy = image + rng.normal(0, 3, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), labels, instances
