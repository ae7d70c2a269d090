"""Areas, fractions, N:C ratio and unit conversion of a label mask: pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.engine.contract import CLASS_NAMES, REGIONS

_CYTOPLASM = CLASS_NAMES.index("cytoplasm")
_NUCLEUS = CLASS_NAMES.index("nucleus")


@dataclass(frozen=True)
class Measurements:
    """What is measured on one mask; `areas_um2` is None without a pixel size."""

    width: int
    height: int
    areas_px: dict[str, int]
    areas_um2: dict[str, float] | None
    fractions: dict[str, float]
    nc_ratio: float | None


def class_areas(mask: np.ndarray) -> dict[str, int]:
    """Pixel counts of nucleus, cytoplasm and the whole cell (their union) in an `(H, W)` label mask."""
    # count_nonzero per class: np.bincount would first copy the mask to 8-byte integers.
    nucleus, cytoplasm = int(np.count_nonzero(mask == _NUCLEUS)), int(np.count_nonzero(mask == _CYTOPLASM))
    areas = {"nucleus": nucleus, "cytoplasm": cytoplasm, "cell": nucleus + cytoplasm}
    return {region: areas[region] for region in REGIONS}


def to_square_microns(areas_px: dict[str, int], pixel_size_um: float) -> dict[str, float]:
    """Areas in µm², for square pixels `pixel_size_um` microns on a side.

    Rounded to 1e-6 µm², far below any optical resolution, so that float noise (128.94000000000003)
    does not reach reports.
    """
    pixel_area = pixel_size_um * pixel_size_um
    return {name: round(area * pixel_area, 6) for name, area in areas_px.items()}


def measure(mask: np.ndarray, pixel_size_um: float | None = None) -> Measurements:
    """Measure an `(H, W)` uint8 label mask (0 background, 1 cytoplasm, 2 nucleus).

    Args:
        mask: class ids at the image's own size.
        pixel_size_um: microns per pixel, or None for pixel units only.

    Returns:
        Areas, fractions of the image area, and nucleus / cytoplasm area (None without cytoplasm).
    """
    height, width = mask.shape
    areas = class_areas(mask)
    total = height * width
    return Measurements(
        width=width,
        height=height,
        areas_px=areas,
        areas_um2=to_square_microns(areas, pixel_size_um) if pixel_size_um else None,
        fractions={name: area / total for name, area in areas.items()},
        nc_ratio=areas["nucleus"] / areas["cytoplasm"] if areas["cytoplasm"] else None,
    )
