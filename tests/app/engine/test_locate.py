"""Leukocyte finder on generated smear fields: counts, boxes, border flag, lobes, empty fields, scale."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from app.engine import locate
from app.engine.locate import Candidate, find_leukocytes
from model_training.synthetic import FIELD_COLOURS, lobes
from model_training.synthetic import make_field as synthetic_field

cv2.setNumThreads(1)

RBC_RADIUS = 25


def _lobes(cx: int, cy: int, count: int = 3) -> list[tuple[int, int, int]]:
    return lobes(cx, cy, count)


def make_field(cells, size=(480, 640), seed=0, red_cells=28, platelets=4) -> np.ndarray:
    """The generated field's image only (`model_training.synthetic.make_field`)."""
    return synthetic_field(cells, size, seed, red_cells, platelets, RBC_RADIUS)[0]


def cell_box(cx: int, cy: int, radius: int, shape) -> tuple[int, int, int, int]:
    """Drawn cell as a clipped (x0, y0, x1, y1) box."""
    h, w = shape[:2]
    return (max(0, cx - radius), max(0, cy - radius), min(w, cx + radius + 1), min(h, cy + radius + 1))


def iou(candidate: Candidate, box) -> float:
    """IoU of a candidate's bbox with an (x0, y0, x1, y1) box."""
    x, y, w, h = candidate.bbox
    ix = max(0, min(x + w, box[2]) - max(x, box[0]))
    iy = max(0, min(y + h, box[3]) - max(y, box[1]))
    inter = ix * iy
    return inter / (w * h + (box[2] - box[0]) * (box[3] - box[1]) - inter)


LOBED = (170, 150, 40, _lobes(170, 150))
ROUND = (460, 300, 36, [(460, 300, 22)])
CUT = (620, 90, 40, [(622, 90, 22)])  # cell and nucleus run past the right edge


def three_cell_field() -> np.ndarray:
    return make_field([LOBED, ROUND, CUT])


def test_finds_each_drawn_leukocyte_with_a_good_box():
    image = three_cell_field()
    found = find_leukocytes(image)
    assert len(found) == 3
    for cx, cy, radius, _ in (LOBED, ROUND, CUT):
        best = max(iou(c, cell_box(cx, cy, radius, image.shape)) for c in found)
        assert best >= 0.5, (cx, cy, found)


def test_candidate_fields_are_sane():
    image = three_cell_field()
    found = find_leukocytes(image)
    h, w = image.shape[:2]
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    for c in found:
        x, y, bw, bh = c.bbox
        assert 0 <= x < x + bw <= w and 0 <= y < y + bh <= h
        assert 0.0 <= c.score <= 1.0
        assert c.nucleus_area_px > 0


def test_only_the_cut_cell_touches_the_border():
    image = three_cell_field()
    found = find_leukocytes(image)
    cut = max(found, key=lambda c: iou(c, cell_box(*CUT[:3], image.shape)))
    assert cut.touches_border
    assert sum(c.touches_border for c in found) == 1


def test_lobes_of_one_nucleus_are_one_cell():
    image = make_field([LOBED], seed=3)
    found = find_leukocytes(image)
    assert len(found) == 1
    assert iou(found[0], cell_box(*LOBED[:3], image.shape)) >= 0.5
    lobe_area = sum(np.pi * r * r for _, _, r in LOBED[3])
    assert 0.5 * lobe_area <= found[0].nucleus_area_px <= 2.0 * lobe_area


def test_blank_image_gives_nothing():
    blank = np.empty((480, 640, 3), np.uint8)
    blank[:] = FIELD_COLOURS["background"]
    assert find_leukocytes(blank) == []
    assert find_leukocytes(np.zeros((480, 640, 3), np.uint8)) == []


def test_red_cells_and_platelets_only_give_nothing():
    for seed in range(3):
        assert find_leukocytes(make_field([], seed=seed, red_cells=40, platelets=8)) == []


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_rescaled_field_gives_the_same_count(factor):
    image = three_cell_field()
    resized = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    assert len(find_leukocytes(resized)) == 3


def test_crop_filled_by_one_leukocyte():
    image = make_field([(60, 60, 45, _lobes(60, 60))], size=(120, 120), seed=5, red_cells=2, platelets=0)
    found = find_leukocytes(image)
    assert len(found) == 1
    assert iou(found[0], cell_box(60, 60, 45, image.shape)) >= 0.5


def test_diameter_hint_gives_the_same_cells():
    image = three_cell_field()
    assert len(find_leukocytes(image, cell_diameter_px=80.0)) == 3


def test_large_image_is_processed_quickly():
    image = cv2.resize(three_cell_field(), (3200, 2400), interpolation=cv2.INTER_LINEAR)
    start = time.perf_counter()
    found = find_leukocytes(image)
    assert time.perf_counter() - start < 2.0
    assert len(found) == 3


def test_large_image_of_large_cells_finds_cells_wider_than_the_tile_overlap():
    # A field from a high-resolution camera: cells about 600 px across, wider than the tiles' overlap,
    # so that no tile would hold some of them whole.
    small = three_cell_field()
    factor = 8
    image = cv2.resize(small, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    expected = sorted(c.bbox for c in find_leukocytes(small))
    found = sorted(c.bbox for c in find_leukocytes(image))
    assert len(found) == len(expected) == 3
    for (x, y, w, h), box in zip(expected, found, strict=True):
        scaled = (x * factor, y * factor, (x + w) * factor, (y + h) * factor)
        assert iou(Candidate(box, 0.0, 0, False), scaled) >= 0.7


def test_a_diameter_hint_on_a_large_field_is_searched_tile_by_tile(monkeypatch):
    # A small hint asks for a full-resolution working copy; on a large image that must happen a tile at a
    # time (a 40 MP image with a 20 px hint took 1.2 GB at once), and still find every cell.
    cells = [(300, 300, 40, _lobes(300, 300)), (1500, 900, 36, [(1500, 900, 22)]),
             (2100, 1500, 40, [(2100, 1500, 22)])]
    image = make_field(cells, size=(1800, 2400), seed=6, red_cells=400, platelets=20)
    sides = []
    original = locate.detect

    def recording(rgb, *args, **kwargs):
        sides.append(max(rgb.shape[:2]))
        return original(rgb, *args, **kwargs)

    monkeypatch.setattr(locate, "detect", recording)
    found = find_leukocytes(image, cell_diameter_px=80.0)
    assert max(sides) <= locate._TILE and len(sides) > 1
    for cx, cy, radius, _ in cells:
        assert max(iou(c, cell_box(cx, cy, radius, image.shape)) for c in found) >= 0.5, (cx, cy)


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError):
        find_leukocytes(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError):
        find_leukocytes(np.zeros((64, 64, 3), np.float32))


def _restain(image: np.ndarray, region: np.ndarray, factor: float) -> np.ndarray:
    """`image` with the optical density (relative to the field's background) of `region` times `factor`:
    a nucleus stained `factor` times as strongly."""
    white = np.array(FIELD_COLOURS["background"], np.float32) + 1.0
    od = np.log(white / (image.astype(np.float32) + 1.0))
    od[region] *= factor
    return np.clip(white * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def _two_stains_field(strong: float, faint: float, seed: int = 0) -> np.ndarray:
    """Two round-nucleus leukocytes on one field, the first stained `strong`, the second `faint` times
    as strongly as usual."""
    cells = [(170, 160, 38, [(170, 160, 22)]), (470, 300, 38, [(470, 300, 22)])]
    image, labels, instances = synthetic_field(cells, (480, 640), seed, 28, 4, RBC_RADIUS)
    image = _restain(image, (labels == 2) & (instances == 1), strong)
    return _restain(image, (labels == 2) & (instances == 2), faint)


@pytest.mark.parametrize("seed", [0, 1])
def test_strongly_and_faintly_stained_leukocytes_are_both_found(seed):
    # One global threshold sits between the two nuclei's stain; each object's own threshold does not.
    image = _two_stains_field(strong=2.5, faint=0.4, seed=seed)
    found = find_leukocytes(image)
    assert len(found) == 2, found
    for cx, cy in ((170, 160), (470, 300)):
        assert max(iou(c, cell_box(cx, cy, 38, image.shape)) for c in found) >= 0.5


def test_faint_leukocyte_beside_a_differently_balanced_one():
    # Two fields side by side, the right one photographed with a bluer white balance and a fainter stain
    # (as tiles of a mosaic): both leukocytes are found, nothing else.
    left = make_field([(160, 240, 38, [(160, 240, 22)])], size=(480, 320), seed=4)
    right = make_field([(160, 240, 38, [(160, 240, 22)])], size=(480, 320), seed=5)
    white = np.array(FIELD_COLOURS["background"], np.float32) + 1.0
    od = np.log(white / (right.astype(np.float32) + 1.0)) * 0.45
    right = np.clip(white * np.exp(-od) * np.array([0.85, 0.95, 1.15]) - 1.0, 0, 255).astype(np.uint8)
    image = np.hstack([left, right])
    found = find_leukocytes(image)
    assert len(found) == 2, found
    for cx in (160, 480):
        assert max(iou(c, cell_box(cx, 240, 38, image.shape)) for c in found) >= 0.5


def test_lone_platelet_clump_gives_nothing():
    # A few platelets heaped into one dark blob, much smaller than a nucleus, on a field without leukocyte.
    image = make_field([], seed=2, red_cells=30, platelets=0)
    for dx, dy in ((0, 0), (6, 2), (2, 7), (-5, 4), (3, -5)):
        cv2.circle(image, (320 + dx, 240 + dy), 5, (95, 60, 160), -1)
    assert find_leukocytes(cv2.GaussianBlur(image, (3, 3), 0.8)) == []


@pytest.mark.parametrize("seed", [0, 3])
def test_a_small_pale_object_beside_a_leukocyte_is_dropped(seed):
    # A group just above the size floor, far paler than the field's leukocyte nucleus (a platelet clump's
    # stain), is dropped; without the rule it would pass.
    cells = [(160, 240, 38, [(160, 240, 22)]), (480, 240, 22, [(480, 240, 12)])]
    image, labels, instances = synthetic_field(cells, (480, 640), seed, 28, 0, RBC_RADIUS)
    image = _restain(image, (labels == 2) & (instances == 2), 0.45)
    found = find_leukocytes(image)
    assert len(found) == 1 and iou(found[0], cell_box(160, 240, 38, image.shape)) >= 0.5
    assert len(locate.detect(image, None, locate.Params(pale_size=0.0))) == 2


@pytest.mark.parametrize("seed", [0, 3])
def test_a_small_faint_nucleus_in_a_faintly_stained_field_is_kept(seed):
    # The same pale group as the field's only nucleus: the whole slide is faintly stained, and the rule,
    # relative to the image's own nucleus threshold, keeps it (an absolute floor alone would not).
    cells = [(320, 240, 22, [(320, 240, 12)])]
    image, labels, _ = synthetic_field(cells, (480, 640), seed, 28, 0, RBC_RADIUS)
    image = _restain(image, labels == 2, 0.45)
    assert len(find_leukocytes(image)) == 1
    assert locate.detect(image, None, locate.Params(pale_ratio=100.0)) == []
