"""Cell and nucleus outlines as valid polygons in pixel coordinates (origin top left), and the GeoJSON
that QuPath imports as cell objects.

OpenCV traces each mask's boundary; shapely repairs what tracing can produce that is not a valid
polygon (a spike through a one-pixel neck touches itself), so every outline passes `is_valid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid

from app.engine.cells import NUCLEUS, Cell
from app.engine.contract import REGIONS


def polygons(mask: np.ndarray, offset: tuple[int, int]) -> list[Polygon]:
    """Valid polygons of a boolean `(h, w)` mask's parts (holes kept), shifted by `offset` = (x, y).

    Coordinates are pixel edges: a lone pixel at (x, y) becomes the square from (x, y) to (x+1, y+1).
    """
    # Doubling the mask puts every traced boundary point on a pixel corner after halving.
    doubled = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    shapes: list[Polygon] = []
    for index, contour in enumerate(contours):
        if hierarchy[0][index][3] != -1:  # a hole; taken with its outer ring
            continue
        holes = [_ring(contours[j], offset) for j in range(len(contours)) if hierarchy[0][j][3] == index]
        shapes += _valid_parts(Polygon(_ring(contour, offset), [h for h in holes if len(h) >= 4]))
    return shapes


def _ring(contour: np.ndarray, offset: tuple[int, int]) -> list[tuple[float, float]]:
    """Traced points of the doubled mask → corners of original pixels: the doubled pixels 2x and 2x+1
    of original pixel x lie on its left and right edges, x and x+1, that is ceil(d / 2)."""
    points = (contour.reshape(-1, 2) + 1) // 2 + np.array([offset[0], offset[1]])
    ring = [(float(x), float(y)) for x, y in points]
    return ring + ring[:1] if ring and ring[0] != ring[-1] else ring


def _valid_parts(shape: BaseGeometry) -> list[Polygon]:
    if shape.is_empty:
        return []
    fixed = shape if shape.is_valid else make_valid(shape)
    if isinstance(fixed, Polygon):
        return [fixed] if fixed.area > 0 else []
    return [g for g in getattr(fixed, "geoms", []) if isinstance(g, Polygon) and g.area > 0]


def outline(mask: np.ndarray, offset: tuple[int, int]) -> dict[str, Any] | None:
    """The GeoJSON geometry of the mask's largest part (a cell is one connected region), or None."""
    parts = polygons(mask, offset)
    return mapping(max(parts, key=lambda p: p.area)) if parts else None


def outlines(mask: np.ndarray, offset: tuple[int, int]) -> dict[str, Any] | None:
    """The GeoJSON geometry of every part: a Polygon for one, a MultiPolygon for several (a lobed
    nucleus), None for an empty mask."""
    parts = polygons(mask, offset)
    if not parts:
        return None
    return mapping(parts[0] if len(parts) == 1 else MultiPolygon(parts))


def geojson_document(cells: Sequence[Cell], instances: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A FeatureCollection that QuPath imports as cell objects: per cell a Feature whose `geometry` is the
    cell outline and `nucleusGeometry` the nucleus outline, with `objectType` "cell" and measurements.

    Args:
        cells: the cells, their `bbox` enclosing their pixels.
        instances: `(H, W)` cell ids.
        labels: `(H, W)` class ids.
    """
    features = []
    for cell in cells:
        x0, y0, w, h = cell.bbox
        mine = instances[y0:y0 + h, x0:x0 + w] == cell.id
        geometry = outline(mine, (x0, y0))
        if geometry is None:
            continue
        nucleus = outlines(mine & (labels[y0:y0 + h, x0:x0 + w] == NUCLEUS), (x0, y0))
        measurements: dict[str, float] = {f"{region} area px": cell.areas_px[region] for region in REGIONS}
        if cell.areas_um2:
            measurements |= {f"{region} area µm^2": cell.areas_um2[region] for region in REGIONS}
        if cell.nc_ratio is not None:
            measurements["N:C ratio"] = cell.nc_ratio
        measurements["score"] = cell.score
        feature: dict[str, Any] = {
            "type": "Feature", "id": f"cell-{cell.id}", "geometry": geometry,
            "properties": {"objectType": "cell", "cell_id": cell.id, "touches_border": cell.touches_border,
                           "classification": {"name": "Leukocyte"}, "measurements": measurements}}
        if nucleus is not None:
            feature["nucleusGeometry"] = nucleus
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}
