"""Every leukocyte of an image on its own: a window per cell at the model's scale, and the stitching of
the windows' labels into a class mask and an instance mask at the image's size.

The model was trained on crops in which one leukocyte spans about 60 % of the side (Zheng crops: median
0.68 and 0.57 for the two sources). Each cell the finder reports gets a square window of that
proportion around its box, so that whatever the magnification, the network sees the cell at the size it
learned. The windows of one image run as one batch. Each window's labels are kept only for the pixels
nearer (relative to each cell's size) to its own cell than to any other, so that touching cells are
separated and overlapping windows never fight; of those, the connected cell region over the window's
centre is the instance, cut at its necks when it joins several leukocytes (`split_touching`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from app.engine.contract import CLASS_NAMES
from app.engine.labels import labels_at_size
from app.engine.locate import Candidate, fill_holes, find_leukocytes
from app.engine.measure import class_areas, to_square_microns
from app.engine.transform import InputTransform

#: `(N, 3, h, w)` float32 network inputs → `(N, C, h, w)` logits and the milliseconds of the run(s).
Infer = Callable[[np.ndarray], tuple[np.ndarray, float]]

#: Side of the finder's cell box as a fraction of the window side (training crops: cell ≈ 0.6 of the
#: side; the finder's box is ≈ 1.1 × the true cell).
CELL_FRACTION = 0.65
#: An image up to this many model input sides is a crop: without a finder candidate it gets one
#: whole-image window (`_crop_without_candidates`); such a cell must cover `MIN_CROP_CELL` of the image.
CROP_SIDE_FACTOR = 2.0
MIN_CROP_CELL = 0.1
#: Every cell holds a nucleus of at least this share of its area, unless the image border cuts it
#: (expert masks of the Zheng crops: 0.20 and up; the engine's BCCD cells: 0.24 and up).
MIN_NUCLEUS_SHARE = 0.15
#: A window within this factor of a crop's longer side is the whole crop.
CROP_WINDOW = 0.75
#: Times a window may grow to hold a cell region that runs into its edge.
GROW_ROUNDS = 3
#: A window's cell region smaller than this fraction of its finder box is not a leukocyte after all.
MIN_AREA_FRACTION = 0.15
#: Touching cells in one region (`split_touching`): a core is where the distance to the region's edge is
#: at least a share of its largest, tried from the first of `SPLIT_CORES` (chosen on BCCD's training
#: split, where three pairs of touching leukocytes came out as one cell); each part must hold `MIN_PART`
#: of the region and a nucleus of `MIN_NUCLEUS_SHARE` of its own area; the cores grow on a copy at most
#: `SPLIT_SIDE` pixels wide.
SPLIT_CORES = (0.5, 0.4, 0.3)
MIN_PART = 0.15
SPLIT_SIDE = 128
#: Windows handed to `infer` at once: memory holds one chunk's inputs and logits, not the image's, and a
#: client that has gone stops the work at the next chunk (`Engine.segment`'s `cancelled`).
RUN_CHUNK = 16
NUCLEUS = CLASS_NAMES.index("nucleus")


@dataclass(frozen=True)
class Window:
    """A square region around one candidate, in input pixels; it may reach past the image's edges."""

    x0: int
    y0: int
    side: int
    candidate: Candidate

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the candidate box's centre."""
        x, y, w, h = self.candidate.bbox
        return x + w / 2, y + h / 2

    @property
    def radius(self) -> float:
        """Half the longer side of the candidate's box."""
        return max(self.candidate.bbox[2], self.candidate.bbox[3]) / 2


@dataclass(frozen=True)
class Cell:
    """One leukocyte: its id in the instance mask and its measurements (see API.md, "Per cell")."""

    id: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    areas_px: dict[str, int]
    areas_um2: dict[str, float] | None
    nc_ratio: float | None
    touches_border: bool
    score: float


def windows_for(candidates: list[Candidate], height: int, width: int) -> list[Window]:
    """One square window per candidate, centred on its box, the box `CELL_FRACTION` of the side; a window
    nearly as large as the image or larger (`CROP_WINDOW` of its longer side) makes it a crop, and the
    window becomes the whole crop: the view the model was trained on."""
    windows = []
    longer = max(height, width)
    for c in candidates:
        x, y, w, h = c.bbox
        side = max(8, round(max(w, h) / CELL_FRACTION))
        if side >= CROP_WINDOW * longer:
            windows.append(Window((width - longer) // 2, (height - longer) // 2, longer, c))
        else:
            windows.append(Window(round(x + w / 2 - side / 2), round(y + h / 2 - side / 2), side, c))
    return windows


def window_pixels(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The `(side, side, ...)` pixels of the square at `(x0, y0)`; beyond the image's edges the image is
    mirrored, as the training crops' zoom-out augmentation pads (`--window-scale` cuts its windows here).
    """
    height, width = image.shape[:2]
    x1, y1 = x0 + side, y0 + side
    inside = image[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    pads = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
    if not any(pads):
        return inside
    mode = cv2.BORDER_REFLECT_101 if min(inside.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    return cv2.copyMakeBorder(inside, *pads, borderType=mode)


def foreground_probability(logits: np.ndarray) -> np.ndarray:
    """`(C, h, w)` logits → `(h, w)` probability that a pixel belongs to a cell (1 − softmax background)."""
    shifted = logits - logits.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    return 1.0 - exp[0] / exp.sum(axis=0)


def segment_cells(pixels: np.ndarray, transform: InputTransform, infer: Infer,
                  cell_diameter_px: float | None = None,
                  admit: Callable[[int], None] | None = None) -> tuple[Stitcher, float]:
    """Find the leukocytes of an `(H, W, 3)` uint8 image, segment each in its window (the windows of the
    image in chunks of `RUN_CHUNK`), and stitch them.

    Two corrections use the model's own view: a window whose cell region runs into its edge (the finder
    boxed only part of the cell, say one nucleus lobe) is replaced by one sized to that region and run
    again; then windows whose cells turn out to be one (each cell region covers the other window's
    centre) are merged into one window and run again.

    Args:
        admit: called with the number of windows (finder candidates) before any model run; it raises
            (`TooManyCellsError`, 413) to refuse the image, so that a field packed with cell-like
            objects cannot buy unbounded model time (`Engine`'s cell limits). None: no limit.

    Returns:
        The stitched masks and cells, and the milliseconds of the model runs.
    """
    height, width = pixels.shape[:2]
    windows = windows_for(find_leukocytes(pixels, cell_diameter_px), height, width)
    if admit is not None:
        admit(len(windows))
    runs = _Runs(pixels, transform, infer)
    if not windows:
        return _crop_without_candidates(runs)
    probabilities, labels = runs.run(windows)
    for _ in range(GROW_ROUNDS):
        grown = {i: g for i in range(len(windows)) if (g := _grown(windows[i], labels[i], height, width))}
        if not grown:
            break
        again, again_labels = runs.run(list(grown.values()))
        for k, i in enumerate(grown):
            windows[i], probabilities[i], labels[i] = grown[i], again[k], again_labels[k]
        runs.keep_only(windows)
    merged = _merge_split_cells(windows, labels, height, width)
    if merged is not None:
        windows = merged
        probabilities, labels = runs.run(windows)
        runs.keep_only(windows)
    stitched = Stitcher(height, width, windows)
    for index in range(len(windows)):
        stitched.add(index, labels[index], probabilities[index])
    return stitched, runs.ms


class _Runs:
    """The model runs of one image, `RUN_CHUNK` windows at a time, each distinct window run once (a grown
    or merged window is often one already run, such as the whole crop). Of each run only what the
    stitching needs is kept: the labels at the window's size and the foreground probability."""

    def __init__(self, pixels: np.ndarray, transform: InputTransform, infer: Infer) -> None:
        self.pixels, self.transform, self.infer = pixels, transform, infer
        self.done: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.ms = 0.0

    def run(self, windows: list[Window]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Foreground probability `(h, w)` (model resolution) and labels `(side, side)` of each window."""
        keys = [(w.x0, w.y0, w.side) for w in windows]
        todo = list({k: w for k, w in zip(keys, windows, strict=True) if k not in self.done}.items())
        for start in range(0, len(todo), RUN_CHUNK):
            chunk = todo[start:start + RUN_CHUNK]
            batch = np.stack([self.transform(window_pixels(self.pixels, w.x0, w.y0, w.side))
                              for _, w in chunk])
            logits, run_ms = self.infer(batch)
            self.ms += run_ms
            for (key, window), lg in zip(chunk, logits, strict=True):
                self.done[key] = (foreground_probability(lg), labels_at_size(lg, (window.side, window.side)))
        return [self.done[k][0] for k in keys], [self.done[k][1] for k in keys]

    def keep_only(self, windows: list[Window]) -> None:
        """Forget the runs of windows that were replaced (grown or merged), so that what is kept stays one
        entry per current window."""
        current = {(w.x0, w.y0, w.side) for w in windows}
        self.done = {k: v for k, v in self.done.items() if k in current}


def _crop_without_candidates(runs: _Runs) -> tuple[Stitcher, float]:
    """A crop-sized image in which the finder saw no nucleus (a pale stain) gets one window over the whole
    image, as the model was trained; its cell region counts only if the model finds one at the centre with
    a nucleus of its own (and is cut, like any other, if it joins several leukocytes through necks).
    Larger images, and crops without such a cell, have none."""
    height, width = runs.pixels.shape[:2]
    if max(height, width) > CROP_SIDE_FACTOR * max(runs.transform.size):
        return Stitcher(height, width, []), 0.0
    whole = Window(0, 0, max(height, width), Candidate((0, 0, width, height), 0.0, 0, True))
    probabilities, labels = runs.run([whole])
    region = _central_region(whole, labels[0])
    if region is None:
        return Stitcher(height, width, []), runs.ms
    if region.sum() < MIN_CROP_CELL * height * width or not _has_nucleus(region, labels[0]):
        return Stitcher(height, width, []), runs.ms
    nucleus = int((labels[0][region] == NUCLEUS).sum())
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
    found = replace(whole, candidate=replace(whole.candidate, bbox=box, nucleus_area_px=nucleus))
    stitched = Stitcher(height, width, [found])
    stitched.add(0, labels[0], probabilities[0])
    return stitched, runs.ms


def _grown(window: Window, labels: np.ndarray, height: int, width: int) -> Window | None:
    """A larger window around the cell region when the region reaches an edge of the window that lies
    inside the image; None when the cell fits."""
    region = _central_region(window, labels)
    if region is None:
        return None
    inside = (window.y0 > 0, window.y0 + window.side < height, window.x0 > 0, window.x0 + window.side < width)
    edges = (region[0].any(), region[-1].any(), region[:, 0].any(), region[:, -1].any())
    if not any(i and e for i, e in zip(inside, edges, strict=True)):
        return None
    ys, xs = np.nonzero(region)
    box = (window.x0 + int(xs.min()), window.y0 + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
    bigger = windows_for([replace(window.candidate, bbox=box)], height, width)[0]
    return bigger if bigger.side > window.side else None


def _merge_split_cells(windows: list[Window], labels: list[np.ndarray], height: int,
                       width: int) -> list[Window] | None:
    """Windows regrouped where two windows' cell regions (the part over each window's centre) each
    cover the other window's centre; None when nothing is merged."""
    regions = [_central_region(w, lb) for w, lb in zip(windows, labels, strict=True)]
    group = list(range(len(windows)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(windows)):
        for j in range(i + 1, len(windows)):
            if _covers(windows[i], regions[i], windows[j]) and _covers(windows[j], regions[j], windows[i]):
                group[root(j)] = root(i)
    if all(root(i) == i for i in range(len(windows))):
        return None
    members: dict[int, list[Candidate]] = {}
    for i, window in enumerate(windows):
        members.setdefault(root(i), []).append(window.candidate)
    return windows_for([_union(cs) for cs in members.values()], height, width)


def _central_region(window: Window, labels: np.ndarray) -> np.ndarray | None:
    _, components = cv2.connectedComponents((labels > 0).astype(np.uint8), connectivity=8)
    centre = components[window.side // 2, window.side // 2]
    return components == centre if centre else None


def _covers(window: Window, region: np.ndarray | None, other: Window) -> bool:
    """Whether `window`'s cell region holds the centre of `other`'s candidate."""
    if region is None:
        return False
    x, y = (int(v) for v in other.centre)
    col, row = x - window.x0, y - window.y0
    return 0 <= row < window.side and 0 <= col < window.side and bool(region[row, col])


def _union(candidates: list[Candidate]) -> Candidate:
    """One candidate covering several: the union of their boxes, the best score."""
    x0 = min(c.bbox[0] for c in candidates)
    y0 = min(c.bbox[1] for c in candidates)
    x1 = max(c.bbox[0] + c.bbox[2] for c in candidates)
    y1 = max(c.bbox[1] + c.bbox[3] for c in candidates)
    best = max(candidates, key=lambda c: c.score)
    return replace(best, bbox=(x0, y0, x1 - x0, y1 - y0),
                   nucleus_area_px=sum(c.nucleus_area_px for c in candidates),
                   touches_border=any(c.touches_border for c in candidates))


class Stitcher:
    """Builds the class and instance masks of one image from its windows' labels."""

    def __init__(self, height: int, width: int, windows: list[Window]) -> None:
        self.labels = np.zeros((height, width), np.uint8)
        self.instances = np.zeros((height, width), np.uint16)
        self.windows = windows
        self.scores: list[float] = []
        self.regions: list[tuple[int, int, int, int]] = []  # (x0, y0, x1, y1) holding each cell

    def add(self, index: int, labels: np.ndarray, probability: np.ndarray) -> None:
        """Take window `index`'s cell from its `(side, side)` labels and `(h, w)` foreground probability
        (model resolution); windows should come in descending finder score. A region without a nucleus
        of `MIN_NUCLEUS_SHARE` of its area is no leukocyte, unless the image border cuts it."""
        window = self.windows[index]
        height, width = self.labels.shape
        x0, y0 = max(0, window.x0), max(0, window.y0)
        x1, y1 = min(width, window.x0 + window.side), min(height, window.y0 + window.side)
        if x1 <= x0 or y1 <= y0:
            return
        local = labels[y0 - window.y0:y1 - window.y0, x0 - window.x0:x1 - window.x0]
        region = (local > 0) & self._nearest(index, x0, y0, x1, y1) & (self.instances[y0:y1, x0:x1] == 0)
        cell = self._central_component(region, window, x0, y0)
        _, _, w, h = window.candidate.bbox
        if cell is None or cell.sum() < MIN_AREA_FRACTION * w * h:
            return
        cut = (y0 == 0 and cell[0].any()) or (y1 == height and cell[-1].any()) or \
            (x0 == 0 and cell[:, 0].any()) or (x1 == width and cell[:, -1].any())
        if not cut and not _has_nucleus(cell, local):
            return  # no nucleus of its own inside the image: not a leukocyte
        for part in split_touching(cell, local):  # each part a leukocyte with a nucleus of its own
            self.instances[y0:y1, x0:x1][part] = len(self.scores) + 1
            self.labels[y0:y1, x0:x1][part] = local[part]
            self.scores.append(self._score(window, part, probability, (x0 - window.x0, y0 - window.y0)))
            self.regions.append((x0, y0, x1, y1))

    def _nearest(self, index: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels of the box nearer to window `index`'s cell than to any other, distances divided by
        each cell's radius (so that a large cell keeps its rim next to a small neighbour)."""
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        cx, cy = self.windows[index].centre
        own = np.hypot(xs - cx, ys - cy) / self.windows[index].radius
        nearest = np.ones(own.shape, bool)
        for j, other in enumerate(self.windows):
            ox, oy = other.centre
            reach = other.radius * 3
            if j == index or ox + reach < x0 or ox - reach > x1 or oy + reach < y0 or oy - reach > y1:
                continue
            nearest &= own <= np.hypot(xs - ox, ys - oy) / other.radius
        return nearest

    @staticmethod
    def _central_component(region: np.ndarray, window: Window, x0: int, y0: int) -> np.ndarray | None:
        """The connected part of `region` under the cell's centre, else the largest part inside its box."""
        count, components = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
        if count <= 1:
            return None
        cx, cy = window.centre
        px, py = int(cx) - x0, int(cy) - y0
        if 0 <= py < region.shape[0] and 0 <= px < region.shape[1] and components[py, px]:
            return components == components[py, px]
        x, y, w, h = window.candidate.bbox
        inside = components[max(0, y - y0):max(0, y + h - y0), max(0, x - x0):max(0, x + w - x0)]
        counts = np.bincount(inside.ravel(), minlength=count)
        counts[0] = 0
        return components == int(counts.argmax()) if counts.max() > 0 else None

    @staticmethod
    def _score(window: Window, cell: np.ndarray, probability: np.ndarray, offset: tuple[int, int]) -> float:
        """Mean of the finder's score and the model's mean foreground probability over the cell."""
        scale = probability.shape[0] / window.side
        ys, xs = np.nonzero(cell)
        rows = np.clip(((ys + offset[1] + 0.5) * scale).astype(int), 0, probability.shape[0] - 1)
        cols = np.clip(((xs + offset[0] + 0.5) * scale).astype(int), 0, probability.shape[1] - 1)
        return round(0.5 * window.candidate.score + 0.5 * float(probability[rows, cols].mean()), 4)


def split_touching(cell: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
    """The cell region cut into the cells it holds when it is two or more leukocytes joined by narrow
    necks (the finder grouped their nuclei as one cell's lobes); else `[cell]`.

    Cores are the parts of the region far from its edge (the distance to the edge of the region, its holes
    filled, at least a share of the largest; shares from the highest of `SPLIT_CORES`, as two cells of
    unequal size only part at a lower one): one round or oval cell has one core, cells touching through a
    neck narrower than the cores have one each. Every pixel goes to the nearest core, the cores growing a
    pixel a step inside the region (on a copy at most `SPLIT_SIDE` pixels wide, so that the cost does not
    grow with the cell's size in pixels). A part is a leukocyte when it holds `MIN_PART` of the region and
    a nucleus of `MIN_NUCLEUS_SHARE` of its own area; parts that are not (a bulge of cytoplasm, a red cell
    the region ran into) are given back to their neighbours, and the cut stands when at least two
    leukocytes remain.
    """
    ys, xs = np.nonzero(cell)
    if xs.size == 0:
        return [cell]
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    box, box_classes = cell[y0:y1, x0:x1], classes[y0:y1, x0:x1]
    filled = fill_holes(box).astype(np.uint8)  # a hole is not an edge: a ring cell stays one cell
    factor = min(1.0, SPLIT_SIDE / max(box.shape))
    small = filled if factor == 1.0 else cv2.resize(
        filled, (max(1, round(box.shape[1] * factor)), max(1, round(box.shape[0] * factor))),
        interpolation=cv2.INTER_NEAREST)
    distance = cv2.distanceTransform(cv2.copyMakeBorder(small, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                                     cv2.DIST_L2, 5)[1:-1, 1:-1]
    for share in SPLIT_CORES:
        count, cores = cv2.connectedComponents((distance >= share * distance.max()).astype(np.uint8),
                                               connectivity=8)
        if count <= 2:
            continue
        owner = _owners(cores, small, box)
        pieces = [owner == k for k in range(1, count)]
        kept = [k for k, piece in enumerate(pieces, 1)
                if piece.sum() >= MIN_PART * xs.size and _has_nucleus(piece, box_classes)]
        if len(kept) < 2:
            continue
        if len(kept) < count - 1:  # regrow from the leukocytes' cores only: the others join a neighbour
            relabel = np.zeros(count, np.int32)
            relabel[kept] = np.arange(1, len(kept) + 1)
            owner = _owners(relabel[cores], small, box)
        parts = []
        for k in range(1, len(kept) + 1):
            part = np.zeros_like(cell)
            part[y0:y1, x0:x1] = owner == k
            parts.append(part)
        return parts
    return [cell]


def _owners(cores: np.ndarray, small: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Core labels `(h, w)` of the working copy grown over the region `small`, at the size of the
    region's `box`, zero outside the region."""
    owner = _grown_within(cores.astype(np.uint16), small > 0)
    if owner.shape != box.shape:
        # Every pixel of the working copy's box gets its nearest part, so that the cell's pixels that the
        # copy lost at its edge find one too.
        owner = cv2.resize(_grown_within(owner, np.ones(owner.shape, bool)), box.shape[::-1],
                           interpolation=cv2.INTER_NEAREST)
    return np.where(box, owner, 0)


def _has_nucleus(region: np.ndarray, classes: np.ndarray) -> bool:
    """Whether the boolean `region` of the class ids `classes` holds a nucleus of `MIN_NUCLEUS_SHARE` of
    its area: what every leukocyte has."""
    return int((classes[region] == NUCLEUS).sum()) >= MIN_NUCLEUS_SHARE * int(region.sum())


def _grown_within(owner: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Labels `owner` grown a pixel a step into the unlabelled pixels of `region` until none is left
    that a label can reach."""
    kernel = np.ones((3, 3), np.uint8)
    while True:
        free = region & (owner == 0)
        grown = cv2.dilate(owner, kernel)
        reached = free & (grown > 0)
        if not reached.any():
            return owner
        owner[reached] = grown[reached]


def measure_cells(stitched: Stitcher, pixel_size_um: float | None) -> list[Cell]:
    """Per-cell box, centroid, areas, N:C ratio and border flag from the stitched masks (each cell is
    looked for only in the window region that holds it, so cost grows with cells, not with pixels)."""
    height, width = stitched.instances.shape
    cells = []
    for index, (rx0, ry0, rx1, ry1) in enumerate(stitched.regions):
        cell_id = index + 1
        mine = stitched.instances[ry0:ry1, rx0:rx1] == cell_id
        ys, xs = np.nonzero(mine)
        areas = class_areas(stitched.labels[ry0:ry1, rx0:rx1][mine])
        x0, x1, y0, y1 = int(xs.min()) + rx0, int(xs.max()) + rx0, int(ys.min()) + ry0, int(ys.max()) + ry0
        cells.append(Cell(
            id=cell_id, bbox=(x0, y0, x1 - x0 + 1, y1 - y0 + 1),
            centroid=(round(float(xs.mean()) + rx0, 2), round(float(ys.mean()) + ry0, 2)), areas_px=areas,
            areas_um2=to_square_microns(areas, pixel_size_um) if pixel_size_um else None,
            nc_ratio=areas["nucleus"] / areas["cytoplasm"] if areas["cytoplasm"] else None,
            touches_border=x0 == 0 or y0 == 0 or x1 == width - 1 or y1 == height - 1,
            score=stitched.scores[index]))
    return cells


def primary_cell(cells: list[Cell], instances: np.ndarray) -> int | None:
    """The cell under the image's centre, else the nearest one whose box covers ≥ 10 % of the image."""
    height, width = instances.shape
    at_centre = int(instances[height // 2, width // 2])
    if at_centre:
        return at_centre
    large = [c for c in cells if c.bbox[2] * c.bbox[3] >= 0.1 * height * width]
    if not large:
        return None
    return min(large, key=lambda c: (c.centroid[0] - width / 2) ** 2 + (c.centroid[1] - height / 2) ** 2).id
