"""Find leukocytes (white blood cells) on a stained blood-smear image, with numpy and OpenCV only.

Leukocyte nuclei absorb red light strongly and blue light weakly (haematoxylin/azure stains them
purple), whereas red cells absorb mostly green and blue, and the background hardly anything. So in
optical density (OD, relative to the image's own brightest tone) the feature
``OD_red + OD_green / 2 - OD_blue`` is high on nuclei only (and on platelets, which are rejected by
size). The steps, on a downscaled copy:

1. nucleus mask: Otsu threshold of that feature above an absolute floor (an image without any nucleus
   gives nothing), cleaned by a small opening;
2. scale: the red-cell radius, from the distance transform of the stained, hole-filled non-nucleus
   mask (or from ``cell_diameter_px`` when given, or from the nuclei themselves when no red cells show);
   then nuclei that the global threshold missed are added from a mask with a threshold per stained
   object (below), so that leukocytes stained unequally in one image (a pale one beside a dark one, or
   mosaics of crops from several slides) are all kept, where one global threshold sits above the paler
   nuclei; an object the global mask already mostly holds keeps its global outline:
   a. local contrast: the feature minus its local baseline, the median of block means (blocks of one
      red-cell radius) over 7 x 7 blocks, i.e. about three red-cell diameters, so that the surrounding
      red cells and background read 0 wherever the white point or stain drifts; a leukocyte covers
      well under half of such a window;
   b. objects: connected pixels of contrast above the floor;
   c. each object's own threshold is the global Otsu threshold of the contrast, lowered to half the
      object's own peak contrast when that is lower (a faint nucleus is cut at half its height, as a
      strong one is cut well below its), never below the floor;
3. lobes closer than a fraction of that scale, or of their own size, form one cell (neutrophils);
4. groups smaller than a fraction of a red cell (platelets, debris) are dropped, and so are groups
   both just above that size and pale, pale meaning below an absolute level of the feature and below
   a multiple of the image's own nucleus threshold, so that on a faintly stained slide, where every
   nucleus is pale, small leukocytes stay (platelet clumps; on BCCD's training split a clump on a
   leukocyte-free strip measured 0.24 of a red cell, mean feature 0.49, 1.31 times its image's
   threshold; the smallest pale leukocyte 0.30, 0.48 and 1.47; the smallest leukocytes 0.23-0.25 with
   0.93-0.97);
5. the cell box is the nucleus box grown by a margin relative to the scale, and not smaller than a
   typical leukocyte (a multiple of the red-cell radius), clipped to the image.

All sizes are relative to the estimated scale, so the same rules hold from 0.25x to 4x magnification.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

_WORK_SIDE = 320  # longest side of the working copy when no scale hint is given
_HINT_WORK_RADIUS = 14.0  # red-cell radius, in working pixels, aimed at when a hint gives the scale
_MIN_WORK_RADIUS = 7.0  # below this red-cell radius the working copy is redone at a finer scale
_WBC_PER_RBC_RADIUS = 1.6  # typical leukocyte diameter / red-cell diameter (about 12 µm / 7.5 µm)
_FEATURE_FLOOR = 0.3  # lowest nucleus threshold on the nucleus feature (natural-log OD units)


@dataclass(frozen=True)
class Candidate:
    """One leukocyte found: box of the whole cell in input pixels, confidence, nucleus size."""

    bbox: tuple[int, int, int, int]  # x, y, width, height
    score: float  # 0..1
    nucleus_area_px: int
    touches_border: bool


@dataclass(frozen=True)
class Params:
    """Tunable rules, all relative to the red-cell radius ``s`` (working pixels)."""

    merge: float = 0.25  # lobes within 2*merge*s of each other form one cell
    self_merge: float = 0.4  # ... or within self_merge times their own equivalent radius
    min_area: float = 0.2  # a nucleus group must cover at least min_area * pi * s^2
    min_share: float = 0.15  # ... and at least min_share of the largest group
    margin: float = 0.45  # the nucleus box grows by margin * s on each side (adaptive mode)
    min_cell: float = 0.8  # the cell box is at least min_cell * 2s wide (adaptive mode)
    adaptive: bool = False  # True: margin and min_cell; False: grow by fixed_growth of the nucleus size
    fixed_growth: float = 0.2
    pale_size: float = 0.27  # a group under pale_size * pi * s^2 (just above min_area) ...
    pale_contrast: float = 0.6  # ... must be stained like a nucleus: a mean feature of at least this
    pale_ratio: float = 1.35  # ... or of this many times the image's own nucleus threshold (a faint stain)


#: Images with a longer side above this are searched in overlapping tiles of this side, so that cells
#: keep enough working pixels however large the image is (a 7300 px field analysed at 320 px would shrink
#: a 80 px leukocyte to 3 px); `_TILE_OVERLAP` is more than a leukocyte at usual magnifications.
_TILE = 1600
_TILE_OVERLAP = 400


def find_leukocytes(rgb: np.ndarray, cell_diameter_px: float | None = None) -> list[Candidate]:
    """Find the leukocytes on an RGB image.

    Args:
        rgb: (H, W, 3) uint8 RGB image: a crop around one cell or a whole field of view.
        cell_diameter_px: optional hint of a leukocyte's diameter in input pixels.

    Returns:
        candidates sorted by descending score; ``[]`` when no leukocyte is seen.
    """
    height, width = rgb.shape[:2]
    hint = cell_diameter_px if cell_diameter_px and cell_diameter_px > 0 else None
    if max(height, width) <= _TILE or (hint is not None and hint > _TILE_OVERLAP / 2):
        # Small images, and hinted cells so large that the hint's scale makes a small working copy.
        return detect(rgb, hint, Params())
    if hint is not None:
        # Hinted cells small enough for the tiles: a tile at a time keeps the full-resolution working
        # copies that a small hint asks for within one tile's memory.
        return _find_in_tiles(rgb, hint)
    # A large image of large cells (a high-resolution camera, a strong objective) needs no tiles: its red
    # cells are wide enough in the whole image's working copy, and a leukocyte wider than the tiles'
    # overlap would be cut by every tile.
    scale = _initial_scale(height, width, None)
    analysed = _analyse(rgb, scale, None)
    radius = analysed[2]
    # Both conditions: the red cells wide enough to work with, and leukocytes (in input pixels) wide
    # enough that the tiles' overlap could cut them, so that an overestimated radius on a crowded
    # field alone does not skip the tiles its small cells need.
    if radius is not None and radius >= _MIN_WORK_RADIUS \
            and 2 * _WBC_PER_RBC_RADIUS * radius / scale > _TILE_OVERLAP / 2:
        return detect(rgb, None, Params(), analysed)
    return _find_in_tiles(rgb)


def _find_in_tiles(rgb: np.ndarray, hint: float | None = None) -> list[Candidate]:
    """`detect` (with the diameter `hint`, if any) on overlapping tiles; a candidate cut by a tile's inner
    edge is left to the tile that holds it whole, and duplicates from overlaps are merged (the higher
    score stays)."""
    height, width = rgb.shape[:2]
    step = _TILE - _TILE_OVERLAP
    found: list[Candidate] = []
    for y0 in range(0, max(1, height - _TILE_OVERLAP), step):
        for x0 in range(0, max(1, width - _TILE_OVERLAP), step):
            y1, x1 = min(height, y0 + _TILE), min(width, x0 + _TILE)
            for c in detect(rgb[y0:y1, x0:x1], hint, Params()):
                x, y, w, h = c.bbox
                inner = (x <= 1 and x0 > 0) or (y <= 1 and y0 > 0) or (x + w >= x1 - x0 - 1 and x1 < width) \
                    or (y + h >= y1 - y0 - 1 and y1 < height)
                if not inner:
                    found.append(replace(c, bbox=(x + x0, y + y0, w, h), touches_border=_at_edge(
                        (x + x0, y + y0, w, h), width, height)))
    kept: list[Candidate] = []
    boxes = np.zeros((len(found), 4), np.int64)  # kept boxes (x, y, w, h), compared all at once
    for c in sorted(found, key=lambda c: -c.score):
        if not kept or (_overlaps(c.bbox, boxes[:len(kept)]) < 0.3).all():
            boxes[len(kept)] = c.bbox
            kept.append(c)
    return kept


def _at_edge(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    x, y, w, h = box
    return x <= 1 or y <= 1 or x + w >= width - 1 or y + h >= height - 1


def _overlaps(a: tuple[int, int, int, int], boxes: np.ndarray) -> np.ndarray:
    """Intersection of box `a` with each `(x, y, w, h)` row of `boxes`, over the smaller of the two."""
    x, y, w, h = boxes.T
    ix = np.maximum(0, np.minimum(a[0] + a[2], x + w) - np.maximum(a[0], x))
    iy = np.maximum(0, np.minimum(a[1] + a[3], y + h) - np.maximum(a[1], y))
    return ix * iy / np.maximum(1, np.minimum(a[2] * a[3], w * h))


def detect(rgb: np.ndarray, cell_diameter_px: float | None, params: Params,
           analysed: tuple[np.ndarray, np.ndarray, float | None] | None = None) -> list[Candidate]:
    """`find_leukocytes` with explicit rules (used by the benchmark to compare variants); `analysed`:
    `_analyse`'s result (nucleus feature, nucleus mask, red-cell radius) at the initial scale without a
    hint, when the caller has it already."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    if min(height, width) < 8:
        return []
    hint = cell_diameter_px if cell_diameter_px and cell_diameter_px > 0 else None
    scale = _initial_scale(height, width, hint)
    analysis = analysed if analysed is not None and hint is None else _analyse(rgb, scale, hint)
    feature, nucleus, radius = analysis
    if hint is None and radius is not None and radius < _MIN_WORK_RADIUS and scale < 1.0:
        scale = min(1.0, scale * _MIN_WORK_RADIUS * 1.5 / radius)
        feature, nucleus, radius = _analyse(rgb, scale, hint)
    if not nucleus.any():
        return []
    nucleus = _with_missed_nuclei(feature, nucleus, radius)
    if radius is None:
        radius = _radius_from_nuclei(nucleus)
    found = _candidates(feature, nucleus, radius, params)
    return sorted((_to_input(c, scale, width, height) for c in found), key=lambda c: -c.score)


def _initial_scale(height: int, width: int, hint: float | None) -> float:
    """Working scale: the longest side at most _WORK_SIDE, or the hinted cell at a fixed size."""
    if hint is not None:
        rbc_radius = hint / (2 * _WBC_PER_RBC_RADIUS)
        return float(min(1.0, _HINT_WORK_RADIUS / rbc_radius))
    return float(min(1.0, _WORK_SIDE / max(height, width)))


def _analyse(rgb: np.ndarray, scale: float, hint: float | None):
    """The nucleus feature of the working copy (`_nucleus_feature`, which is all that the later steps
    need of its optical density), its global nucleus mask and red-cell radius (working pixels); `detect`
    adds the missed nuclei once it has settled on the working copy."""
    if scale < 1.0:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    else:
        small = rgb
    od = _optical_density(small)
    feature = _nucleus_feature(od)
    nucleus = _nucleus_mask(feature)
    if hint is not None:
        radius: float | None = hint * scale / (2 * _WBC_PER_RBC_RADIUS)
    else:
        radius = _red_cell_radius(od, nucleus)
    return feature, nucleus, radius


def _with_missed_nuclei(feature: np.ndarray, nucleus: np.ndarray, radius: float | None) -> np.ndarray:
    """The global nucleus mask with the nuclei it missed added (step 2 of the module docstring); done
    once, on the working copy the candidates come from."""
    local = _local_nucleus_mask(feature, radius if radius is not None else _radius_from_nuclei(nucleus))
    return nucleus | _missed_objects(local, nucleus)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density relative to the image's bright background (natural log, >= 0)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    white = np.maximum(np.percentile(pixels, 99, axis=0), 64.0)
    od = np.log((white + 1.0) / (rgb.astype(np.float32) + 1.0))
    return np.clip(od, 0.0, None)


def _otsu(values: np.ndarray, top: float) -> float:
    """Otsu threshold of `values` (clipped to [0, top]) in the same units."""
    if values.size == 0 or top <= 0:
        return top
    v8 = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8).reshape(-1, 1)
    threshold, _ = cv2.threshold(v8, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return float(threshold) * top / 255.0


def _nucleus_feature(od: np.ndarray) -> np.ndarray:
    """High where red (and green) light is absorbed but blue is not: nuclei, platelets."""
    return od[..., 0] + 0.5 * od[..., 1] - od[..., 2]


def _nucleus_mask(feature: np.ndarray) -> np.ndarray:
    """Pixels stained like a nucleus: Otsu on the nucleus feature among stained pixels, with a floor."""
    low, high = np.percentile(feature, [5, 99.95])
    if high - low < _FEATURE_FLOOR or np.count_nonzero(feature > _FEATURE_FLOOR) < 16:
        return np.zeros(feature.shape, bool)  # no stained spot stands out (blank or flat image)
    mask = cv2.morphologyEx((feature > _global_threshold(feature)).astype(np.uint8), cv2.MORPH_OPEN,
                            np.ones((3, 3), np.uint8))
    return mask.astype(bool)


def _global_threshold(feature: np.ndarray) -> float:
    """The image's nucleus threshold: Otsu on the nucleus feature among stained pixels, with a floor."""
    return max(_FEATURE_FLOOR, _otsu(feature[feature > _FEATURE_FLOOR / 2], 3.0))


_BASELINE_WINDOW = 7  # the local baseline: median over this many x this many blocks of side s
_PEAK_SHARE = 0.5  # a fainter object's own threshold: this share of its own peak contrast
_BASELINE_GRID = 256  # most blocks on a side of the baseline's grid


def _local_contrast(feature: np.ndarray, radius: float) -> np.ndarray:
    """Nucleus feature minus its local baseline: the median, over a window of a few red-cell sizes, of
    block means (blocks of one red-cell radius), so the level of the surrounding background and red cells
    (which shifts with the white point and stain of that part of the image) reads 0."""
    height, width = feature.shape
    # At most `_BASELINE_GRID` blocks a side: a tiny diameter hint on a huge image must not make millions.
    block = max(2.0, radius, max(height, width) / _BASELINE_GRID)
    grid = (max(1, round(width / block)), max(1, round(height / block)))
    means = cv2.resize(feature.astype(np.float32), grid, interpolation=cv2.INTER_AREA)
    k = _BASELINE_WINDOW
    padded = cv2.copyMakeBorder(means, k // 2, k // 2, k // 2, k // 2, cv2.BORDER_REFLECT)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
    baseline = np.median(windows.reshape(grid[1], grid[0], -1), axis=2).astype(np.float32)
    return feature - cv2.resize(baseline, (width, height), interpolation=cv2.INTER_LINEAR)


def _local_nucleus_mask(feature: np.ndarray, radius: float) -> np.ndarray:
    """Nucleus mask with a threshold per stained object (see the module docstring)."""
    contrast = _local_contrast(feature, radius)
    low = cv2.morphologyEx((contrast > _FEATURE_FLOOR).astype(np.uint8), cv2.MORPH_OPEN,
                           np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(low, connectivity=8)
    if count <= 1:
        return low.astype(bool)
    threshold = max(_FEATURE_FLOOR, _otsu(contrast[contrast > _FEATURE_FLOOR / 2], 3.0))
    smooth = cv2.blur(contrast, (3, 3))
    peaks = np.full(count, -np.inf, np.float32)
    inside = low > 0
    np.maximum.at(peaks, labels[inside].astype(np.intp), smooth[inside])
    own = np.maximum(_FEATURE_FLOOR, np.minimum(threshold, _PEAK_SHARE * peaks))
    mask = inside & (contrast > own[labels])
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return mask.astype(bool)


def _missed_objects(local: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """The objects of the local mask that the global one mostly missed (less than half of their pixels):
    the fainter nuclei. Where the global threshold already holds a nucleus it stays as it is: in a crop
    that a leukocyte fills, the local baseline is the cell itself and would cut its nucleus into specks."""
    count, labels = cv2.connectedComponents(local.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(local.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=count)
    covered = np.bincount(labels[nucleus], minlength=count)
    keep = covered < 0.5 * sizes
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the enclosed holes of a boolean mask (pale red-cell centres)."""
    height, width = mask.shape
    outside = np.ones((height + 2, width + 2), np.uint8)
    outside[1:-1, 1:-1] = ~mask
    cv2.floodFill(outside, None, (0, 0), 2)
    return mask | (outside[1:-1, 1:-1] == 1)


def _red_cell_radius(od: np.ndarray, nucleus: np.ndarray) -> float | None:
    """Typical red-cell radius from the stained non-nucleus area, or None when too little shows.

    For a disc of radius r the 95th percentile of the distance transform is about 0.78 r.
    """
    density = od[..., 1]
    top = float(np.percentile(density, 90))
    threshold = max(0.06, _otsu(density, top)) if top > 0.06 else 0.06
    stained = (density > threshold) & ~cv2.dilate(nucleus.astype(np.uint8), np.ones((3, 3))).astype(bool)
    stained = cv2.morphologyEx(stained.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    stained = fill_holes(stained.astype(bool))
    if stained.mean() < 0.05 or stained.mean() > 0.95:
        return None
    distance = cv2.distanceTransform(stained.astype(np.uint8), cv2.DIST_L2, 5)
    radius = float(np.percentile(distance[stained], 95)) / 0.78
    return radius if radius >= 2.0 else None


def _radius_from_nuclei(nucleus: np.ndarray) -> float:
    """Fallback scale: a leukocyte nucleus is about a red cell in size; use the largest blob."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(nucleus.astype(np.uint8), connectivity=8)
    largest = float(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 1.0
    return max(2.0, float(np.sqrt(largest / np.pi)))


def _candidates(feature: np.ndarray, nucleus: np.ndarray, radius: float, params: Params) -> list[tuple]:
    """Group lobes, reject small groups, and box each cell (working pixels)."""
    count, labels = _group_lobes(nucleus, radius, params)
    areas = np.bincount(labels.ravel(), minlength=count)[1:]
    floor = max(params.min_area * np.pi * radius**2, params.min_share * areas.max(initial=0))
    height, width = nucleus.shape
    found = []
    pale: float | None = None  # below this mean feature a small group is pale (computed when needed)
    pixels = _pixels_by_label(labels, areas)
    for label in np.flatnonzero(areas >= max(floor, 1)) + 1:
        ys, xs = np.divmod(pixels[label - 1], width)
        box = _cell_box(xs, ys, radius, params, width, height)
        contrast = float(np.mean(feature[ys, xs]))
        size = xs.size / (np.pi * radius**2)
        if size < params.pale_size:
            if pale is None:
                pale = min(params.pale_contrast, params.pale_ratio * _global_threshold(feature))
            if contrast < pale:
                continue  # small and pale: a platelet clump
        found.append((box, 0.5 * min(1.0, size) + 0.5 * min(1.0, contrast), xs.size))
    return found


def _pixels_by_label(labels: np.ndarray, areas: np.ndarray) -> list[np.ndarray]:
    """Flat indices of the pixels of labels 1, 2, ... (`areas` of each), each in row-major order: one
    sort for all the groups instead of a pass over the image per group."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    ordered = where[np.argsort(flat[where], kind="stable")]
    return np.split(ordered, np.cumsum(areas)[:-1])


def _group_lobes(nucleus: np.ndarray, radius: float, params: Params) -> tuple[int, np.ndarray]:
    """Label nucleus pixels so that nearby lobes share a label.

    Each blob is grown by the larger of merge * s and self_merge * its own equivalent radius (drawn as
    a thick outline); blobs whose grown shapes touch are one group.
    """
    contours, _ = cv2.findContours(nucleus.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    grown = np.zeros(nucleus.shape, np.uint8)
    for contour in contours:
        own = np.sqrt(max(cv2.contourArea(contour), 1.0) / np.pi)
        k = max(1, round(max(params.merge * radius, params.self_merge * own)))
        cv2.drawContours(grown, [contour], -1, 1, thickness=cv2.FILLED)
        cv2.drawContours(grown, [contour], -1, 1, thickness=2 * k + 1)
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    return count, np.where(nucleus, labels, 0)


def _cell_box(xs, ys, radius: float, params: Params, width: int, height: int) -> tuple[float, ...]:
    """Cell box (x0, y0, x1, y1), unclipped, grown from the nucleus pixels."""
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()) + 1, float(ys.min()), float(ys.max()) + 1
    if not params.adaptive:
        grow = params.fixed_growth * max(x1 - x0, y1 - y0)
        return (x0 - grow, y0 - grow, x1 + grow, y1 + grow)
    margin = params.margin * radius
    x0, x1, y0, y1 = x0 - margin, x1 + margin, y0 - margin, y1 + margin
    half = params.min_cell * radius
    cx, cy = float(xs.mean()), float(ys.mean())
    return (min(x0, cx - half), min(y0, cy - half), max(x1, cx + half), max(y1, cy + half))


def _to_input(found: tuple, scale: float, width: int, height: int) -> Candidate:
    """Working-pixel box to a clipped input-pixel Candidate with its border flag."""
    (x0, y0, x1, y1), score, area = found
    x0, y0, x1, y1 = (v / scale for v in (x0, y0, x1, y1))
    touches = x0 <= 1 or y0 <= 1 or x1 >= width - 1 or y1 >= height - 1
    x0, y0 = max(0, round(x0)), max(0, round(y0))
    x1, y1 = min(width, round(x1)), min(height, round(y1))
    return Candidate(
        bbox=(x0, y0, max(1, x1 - x0), max(1, y1 - y0)),
        score=round(float(score), 4),
        nucleus_area_px=round(area / scale**2),
        touches_border=bool(touches),
    )
