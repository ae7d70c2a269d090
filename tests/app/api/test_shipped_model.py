"""The shipped model segments the sample images plausibly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.service import png_array, running, upload

from app.api.settings import Settings

REPO = Path(__file__).resolve().parents[3]
WEIGHTS = REPO / "weights" / "model.onnx"
EXAMPLES = sorted((REPO / "examples").glob("*.png"))

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="weights/model.onnx is not there yet")


def _expert_labels(name: str) -> np.ndarray:
    """The expert mask of an example as class ids (nearest of the grey levels 0, 128, 255)."""
    grey = np.asarray(Image.open(REPO / "examples" / "masks" / name).convert("L"), np.int16)
    return np.abs(grey[..., None] - np.array([0, 128, 255])).argmin(axis=2).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_examples_are_there() -> None:
    assert EXAMPLES, "examples/*.png"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_shipped_model_finds_a_nucleus_inside_the_cell(settings_for: Callable[..., Settings],
                                                       path: Path) -> None:
    with running(settings_for(model_path=WEIGHTS)) as client:
        assert client.get("/health/ready").status_code == 200
        response = client.post("/v1/segment?format=png", files=upload(path.read_bytes(), path.name))
    mask = png_array(response.content)
    with Image.open(path) as image:
        assert mask.shape == (image.height, image.width)
    nucleus, cell = mask == 2, mask > 0
    assert nucleus.sum() > 0.01 * mask.size, "a nucleus is found"
    assert nucleus.sum() < cell.sum(), "with cytoplasm around it"
    rows, cols = np.nonzero(nucleus)
    cell_rows, cell_cols = np.nonzero(cell)
    assert cell_rows.min() <= rows.min() and rows.max() <= cell_rows.max()
    assert cell_cols.min() <= cols.min() and cols.max() <= cell_cols.max()
    assert cell[int(rows.mean()), int(cols.mean())], "the nucleus's centre lies in the cell"
    expert = _expert_labels(path.name)
    assert (expert[nucleus] > 0).mean() > 0.9, "the nucleus lies inside the expert's cell"
    assert _dice(nucleus, expert == 2) > 0.8
    assert _dice(cell, expert > 0) > 0.8
