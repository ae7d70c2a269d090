"""Every leukocyte on its own, through the engine with the shipped model, on generated fields and crops:
counts, ids, boxes, border flags, the primary cell, touching cells, empty images, scale."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from support.service import encode, sample_rgb

from app.engine import Engine, Failure, ModelConfig, Options, Result, Upload, cells
from app.engine.cells import Stitcher, Window, split_touching
from app.engine.locate import Candidate
from model_training.synthetic import lobes, make_field, packed_cells

SHIPPED = Path(__file__).resolve().parents[3] / "weights" / "model.onnx"
LOBED = (170, 150, 40, lobes(170, 150))
ROUND = (460, 300, 36, [(460, 300, 22)])
CUT = (620, 90, 40, [(622, 90, 22)])  # runs past the right edge


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.open(ModelConfig(SHIPPED, device="cpu", intra_op_threads=1), 50_000_000)


def segment(engine: Engine, image: np.ndarray, **options: object) -> Result:
    result = engine.segment(Upload("field.png", encode(image)), Options(mask_png=True, instances_png=True,
                                                                        **options))  # type: ignore[arg-type]
    assert isinstance(result, Result)
    return result


def decode_png(data: bytes | None) -> np.ndarray:
    """The PNG's stored values: class ids of a palette mask, cell ids of a 16-bit instance mask."""
    assert data is not None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(a[0], b[0])) * max(0, min(ay1, by1) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def drawn_boxes(instances: np.ndarray) -> list[tuple[int, int, int, int]]:
    boxes = []
    for i in range(1, int(instances.max()) + 1):
        ys, xs = np.nonzero(instances == i)
        boxes.append((int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1))
    return boxes


def test_a_field_gives_each_leukocyte_its_own_id_box_and_border_flag(engine: Engine) -> None:
    image, _, truth = make_field([LOBED, ROUND, CUT])
    result = segment(engine, image)
    instances = decode_png(result.instances_png)
    assert instances.dtype == np.uint16 and instances.shape == image.shape[:2]
    assert len(result.cells) == 3
    assert sorted(c.id for c in result.cells) == [1, 2, 3] == sorted(set(np.unique(instances)) - {0})
    for drawn, index in zip(drawn_boxes(truth), range(3), strict=True):
        best = max(result.cells, key=lambda c: box_iou(c.bbox, drawn))
        assert best.touches_border == (index == 2), "only the cell cut by the right edge is flagged"
        if index < 2:
            assert box_iou(best.bbox, drawn) >= 0.5, (index, best.bbox, drawn)
        else:
            # The cut cell: the shipped model (2.0, stain-normalised windows) keeps its nucleus but little
            # of the generated cytoplasm, whose colours lie far from any lab's once half the window is the
            # mirrored cell (MODEL_CARD.md, limitations); its box must still hold the drawn nucleus.
            x, y, _, h = best.bbox
            cx, cy = CUT[3][0][:2]
            assert box_iou(best.bbox, drawn) > 0.25 and x <= cx - 15 and y <= cy - 15 and y + h >= cy + 15
    for cell in result.cells:
        mine = instances == cell.id
        assert cell.areas_px["cell"] == int(mine.sum()) and cell.areas_px["nucleus"] > 0
        assert 0 < cell.score <= 1
    labels = decode_png(result.mask_png)
    assert np.array_equal(labels > 0, instances > 0), "the class mask covers exactly the cells"
    assert result.primary_cell_id is None, "no cell at the centre and none covers 10 % of the field"


def test_the_cell_at_a_crops_centre_is_the_primary_cell(engine: Engine) -> None:
    result = segment(engine, sample_rgb(120, 120, seed=3))
    assert result.cells and result.primary_cell_id is not None
    instances = decode_png(result.instances_png)
    assert instances[60, 60] == result.primary_cell_id


def test_touching_leukocytes_are_separated(engine: Engine) -> None:
    pair = [(300, 240, 40, [(300, 240, 22)]), (376, 240, 40, [(376, 240, 22)])]
    image, _, _ = make_field(pair, red_cells=10)
    result = segment(engine, image)
    assert len(result.cells) == 2
    instances = decode_png(result.instances_png)
    left, right = instances[240, 290], instances[240, 386]
    assert left and right and left != right
    assert all(c.areas_px["nucleus"] > 0.5 * np.pi * 22**2 for c in result.cells)


def test_touching_leukocytes_that_the_finder_gave_as_one_come_out_as_two(engine: Engine, monkeypatch) -> None:
    # The finder grouped both nuclei as one cell's lobes: one window over both, and one region from the
    # model, which the engine cuts at the neck.
    pair = [(284, 240, 40, [(284, 240, 22)]), (366, 240, 40, [(366, 240, 22)])]
    image, _, _ = make_field(pair, red_cells=10)
    both = Candidate(bbox=(245, 195, 160, 90), score=0.9, nucleus_area_px=3000, touches_border=False)
    monkeypatch.setattr(cells, "find_leukocytes", lambda *args, **kwargs: [both])
    result = segment(engine, image)
    assert len(result.cells) == 2, [c.bbox for c in result.cells]
    instances = decode_png(result.instances_png)
    left, right = instances[240, 280], instances[240, 370]
    assert left and right and left != right
    assert all(c.areas_px["nucleus"] > 0.5 * np.pi * 22**2 for c in result.cells)


def _discs(*discs: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A cell region of (x, y, radius, nucleus radius) discs and its class ids (nucleus 2, cytoplasm 1)."""
    classes = np.zeros((200, 300), np.uint8)
    for x, y, radius, _ in discs:
        cv2.circle(classes, (x, y), radius, 1, -1)
    for x, y, _, nucleus in discs:
        if nucleus:
            cv2.circle(classes, (x, y), nucleus, 2, -1)
    return classes > 0, classes


@pytest.mark.parametrize("second", [40, 28, 22], ids=["equal", "smaller", "much-smaller"])
def test_split_touching_cuts_two_leukocytes_at_their_neck(second: int) -> None:
    cell, classes = _discs((100, 100, 45, 22), (100 + 45 + second - 8, 100, second, second // 2))
    parts = split_touching(cell, classes)
    assert len(parts) == 2
    assert np.array_equal(parts[0] | parts[1], cell) and not (parts[0] & parts[1]).any()
    assert {bool(p[100, 100]) for p in parts} == {True, False}, "each centre in its own part"


def test_split_touching_gives_a_red_cell_in_the_region_to_a_neighbour() -> None:
    # Two leukocytes and a red cell touching the second: the red cell has no nucleus and is no cell of
    # its own, which must not stop the two leukocytes from being cut apart.
    cell, classes = _discs((80, 100, 45, 22), (157, 100, 40, 20), (225, 100, 35, 0))
    parts = split_touching(cell, classes)
    assert len(parts) == 2
    assert np.array_equal(parts[0] | parts[1], cell)
    assert {bool(p[100, 80]) for p in parts} == {True, False}
    same = [bool(p[100, 157]) for p in parts] == [bool(p[100, 230]) for p in parts]
    assert same, "the red cell joins its neighbour"


def test_the_stitcher_keeps_both_leukocytes_of_a_cut_that_gave_a_red_cell_to_one() -> None:
    # The part that took the red cell has a nucleus under 15 % of its area; it is still a leukocyte,
    # judged by its core when the region was cut, and must not be dropped afterwards.
    _, classes = _discs((80, 100, 45, 22), (157, 100, 40, 20), (225, 100, 35, 0))
    labels = np.zeros((300, 300), np.uint8)
    labels[50:250, :] = classes
    window = Window(50, 0, 300, Candidate((70, 100, 220, 100), 0.9, 1, False))
    stitched = Stitcher(400, 400, [window])
    stitched.add(0, labels, np.ones((224, 224), np.float32))
    assert len(stitched.scores) == 2
    assert stitched.instances[150, 130] != stitched.instances[150, 207] != 0


@pytest.mark.parametrize("shape", ["one-disc", "oval", "no-second-nucleus", "bulge", "long-hole"])
def test_split_touching_keeps_one_cell_whole(shape: str) -> None:
    if shape == "one-disc":
        cell, classes = _discs((150, 100, 60, 30))
    elif shape == "oval":
        classes = np.zeros((200, 300), np.uint8)
        cv2.ellipse(classes, (150, 100), (110, 55), 0, 0, 360, 1, -1)
        cv2.ellipse(classes, (150, 100), (60, 25), 0, 0, 360, 2, -1)
        cell = classes > 0
    elif shape == "no-second-nucleus":  # a red cell the region ran into
        cell, classes = _discs((100, 100, 45, 22), (170, 100, 35, 0))
    elif shape == "bulge":  # a small bulge of cytoplasm
        cell, classes = _discs((120, 100, 60, 30), (195, 100, 20, 0))
    else:  # a long hole through the middle (a pale streak the model left out) is not a neck
        cell, classes = _discs((150, 100, 55, 35))
        cell[96:104, 120:180] = False
        classes[~cell] = 0
    parts = split_touching(cell, classes)
    assert len(parts) == 1 and np.array_equal(parts[0], cell)


@pytest.mark.parametrize(("nucleus", "centre_x", "kept"), [
    (0, 150, False),   # cytoplasm only, inside the image: no leukocyte, no cell, never a guess
    (20, 150, True),   # the same region with a nucleus of its own
    (0, 30, True),     # cytoplasm only but cut by the image's edge: its nucleus may lie beyond it
], ids=["no-nucleus", "own-nucleus", "cut-by-the-edge"])
def test_a_region_without_a_nucleus_of_its_own_is_no_cell(nucleus: int, centre_x: int, kept: bool) -> None:
    labels = np.zeros((300, 300), np.uint8)
    labels[:200] = _discs((centre_x, 100, 40, nucleus))[1]
    window = Window(0, 0, 300, Candidate((max(0, centre_x - 40), 60, 80, 80), 0.9, 1, False))
    stitched = Stitcher(300, 300, [window])
    stitched.add(0, labels, np.ones((224, 224), np.float32))
    assert len(stitched.scores) == (1 if kept else 0)
    assert bool(stitched.instances.any()) is kept and bool(stitched.labels.any()) is kept


@pytest.mark.parametrize("red_cells", [0, 30], ids=["blank", "red-cells-only"])
def test_an_image_without_leukocytes_has_no_cells_and_an_empty_mask(engine: Engine, red_cells: int) -> None:
    image, _, _ = make_field([], red_cells=red_cells, platelets=4)
    result = segment(engine, image)
    assert result.cells == [] and result.primary_cell_id is None
    assert result.measurements.areas_px == {"nucleus": 0, "cytoplasm": 0, "cell": 0}
    assert not decode_png(result.mask_png).any() and not decode_png(result.instances_png).any()


def test_the_same_field_at_half_and_double_scale_gives_the_same_cells(engine: Engine) -> None:
    image, _, _ = make_field([LOBED, ROUND], red_cells=20)
    counts, cell_areas = [], []
    for scale in (0.5, 1.0, 2.0):
        scaled = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1
                            else cv2.INTER_LINEAR)
        result = segment(engine, scaled)
        counts.append(len(result.cells))
        cell_areas.append(sorted(c.areas_px["cell"] / scale**2 for c in result.cells))
    assert counts == [2, 2, 2]
    for areas in (cell_areas[0], cell_areas[2]):
        assert np.allclose(areas, cell_areas[1], rtol=0.15), cell_areas


def test_the_request_pixel_size_wins_and_areas_follow_it(engine: Engine) -> None:
    image, _, _ = make_field([ROUND])
    result = segment(engine, image, pixel_size_um=0.5)
    assert (result.pixel_size_um, result.pixel_size_source) == (0.5, "request")
    cell = result.cells[0]
    assert cell.areas_um2 is not None
    assert cell.areas_um2["cell"] == pytest.approx(cell.areas_px["cell"] * 0.25)


def packed_field(side: int = 480) -> tuple[np.ndarray, int]:
    """A field packed with leukocytes, and how many it holds."""
    cells = packed_cells(side)
    image, _, _ = make_field(cells, size=(side, side), red_cells=0, platelets=0)
    return image, len(cells)


def test_an_image_with_more_cells_than_allowed_is_refused_before_any_model_run(engine: Engine) -> None:
    image, count = packed_field()
    runs: list[int] = []

    def counting(images: np.ndarray) -> tuple[np.ndarray, float]:
        runs.append(len(images))
        return engine.infer(images)

    limited = Engine(engine.model, engine.limits, max_cells=count - 1)
    refused = limited.segment(Upload("packed.png", encode(image)), Options(), counting)
    assert isinstance(refused, Failure)
    assert (refused.error.status, refused.error.slug) == (413, "too-many-cells")
    assert str(count) in refused.error.detail and runs == []
    allowed = Engine(engine.model, engine.limits, max_cells=count).segment(
        Upload("packed.png", encode(image)), Options(), counting)
    assert isinstance(allowed, Result) and len(allowed.cells) == count


def test_windows_run_in_chunks_with_the_same_cells_as_one_batch(engine: Engine, monkeypatch) -> None:
    image, count = packed_field(300)
    sizes: list[int] = []

    def counting(images: np.ndarray) -> tuple[np.ndarray, float]:
        sizes.append(len(images))
        return engine.infer(images)

    monkeypatch.setattr(cells, "RUN_CHUNK", 1000)
    whole = engine.segment(Upload("f.png", encode(image)), Options(arrays=True), counting)
    assert sizes[0] == count
    sizes.clear()
    monkeypatch.setattr(cells, "RUN_CHUNK", 3)
    chunked = engine.segment(Upload("f.png", encode(image)), Options(arrays=True), counting)
    assert isinstance(whole, Result) and isinstance(chunked, Result)
    assert max(sizes) == 3 and sum(sizes) >= count
    assert np.array_equal(whole.instances, chunked.instances) and np.array_equal(whole.labels, chunked.labels)
    assert [c.score for c in whole.cells] == [c.score for c in chunked.cells]


def test_the_files_of_one_request_share_one_cell_budget_across_calls(engine: Engine) -> None:
    packed, count = packed_field(300)
    pair, _, _ = make_field([LOBED, ROUND])
    limited = Engine(engine.model, engine.limits, max_cells=count, max_batch_cells=count + 1)
    budget = limited.cell_budget()
    assert budget is not None
    first = limited.segment_many([Upload("packed.png", encode(packed))], Options(), cells=budget)
    second = limited.segment_many([Upload("pair.png", encode(pair))], Options(), cells=budget)  # a 2nd share
    assert isinstance(first[0], Result) and len(first[0].cells) == count
    assert isinstance(second[0], Failure) and second[0].error.slug == "too-many-cells"
    assert "(1)" in second[0].error.detail and budget.left == 1
    alone = limited.segment_many([Upload("pair.png", encode(pair))], Options(), cells=limited.cell_budget())
    assert isinstance(alone[0], Result) and len(alone[0].cells) == 2
