"""Pre- and postprocessing agree with training (PyTorch), and class order follows the metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.service import TINY_INPUT, copy_model, encode, png_array, running, sample_rgb, upload

from app.api.settings import Settings
from app.engine import labels as interpolate
from app.engine.contract import ModelMetadata
from app.engine.imaging import CELL_OUTLINE, CLASS_COLORS, encode_overlay_png
from app.engine.labels import labels_at_size
from app.engine.measure import measure
from app.engine.session import Model, ModelConfig
from app.engine.transform import InputTransform


@pytest.mark.parametrize(("source", "target"), [((64, 64), (575, 575)), ((64, 64), (301, 97)),
                                                ((160, 160), (120, 120)), ((64, 64), (1, 1)),
                                                ((5, 7), (33, 2))],
                         ids=["up", "up-odd", "down", "one-pixel", "tiny"])
@pytest.mark.parametrize("path", ["whole", "row-blocks"])
def test_logit_resize_and_argmax_match_pytorch(source: tuple[int, int], target: tuple[int, int], path: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if path == "row-blocks":  # the bounded-memory path of images above a few megapixels
        monkeypatch.setattr(interpolate, "_WHOLE_PIXELS", 0)
        monkeypatch.setattr(interpolate, "_BLOCK_ELEMENTS", 4096)
    logits = np.random.default_rng(0).standard_normal((3, *source)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=target, mode="bilinear",
                                               align_corners=False)[0].argmax(0).numpy()
    got = labels_at_size(logits, target)
    assert got.shape == target and got.dtype == np.uint8
    assert (got != expected).mean() < 1e-4  # only exact ties, decided in float rounding, may differ


@pytest.mark.parametrize("size", [(300, 300), (120, 120), (97, 211), (40, 23), (20, 100)],
                         ids=["shrink", "shrink-less", "odd", "grow", "grow-one-axis"])
def test_preprocessing_matches_training(tiny_model_dir: Path, size: tuple[int, int]) -> None:
    pytest.importorskip("torch")
    from model_training.transforms import normalize, resize_image, to_tensor

    meta = ModelMetadata.load(tiny_model_dir / "model.json")
    image = sample_rgb(size[1], size[0], seed=5)
    side = meta.input.size[0]
    expected = normalize(resize_image(to_tensor(image), side)).numpy()
    got = InputTransform.from_metadata(meta)(Image.fromarray(image))
    assert got.shape == expected.shape == (3, side, side)
    # A hundredth of a grey level: float rounding, far below the one level of an 8-bit resize.
    assert np.abs(got - expected).max() < 0.01 / 255 / min(meta.normalization.std)


def test_class_order_comes_from_the_metadata(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = Model.open(ModelConfig(tiny_model_dir / "model.onnx", device="cpu"))
    renamed = copy_model(tiny_model_dir, tmp_path, classes=["nucleus", "background", "cytoplasm"])
    reordered = Model.open(ModelConfig(renamed, device="cpu"))
    x = np.random.default_rng(0).standard_normal((2, 3, TINY_INPUT, TINY_INPUT)).astype(np.float32)
    # Output channel k is now called classes[k]: the API's background is channel 1, cytoplasm 2, nucleus 0.
    assert np.allclose(reordered.run(x), reference.run(x)[:, [1, 2, 0]], atol=1e-6)


def test_input_size_comes_from_the_metadata(settings_for: Callable[..., Settings], tiny_model_dir: Path,
                                            tmp_path: Path) -> None:
    data = encode(sample_rgb(96, 80, seed=4))
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    masks = []
    for side in (64, 96):
        resized = {**meta["input"], "size": [side, side]}
        model = copy_model(tiny_model_dir, tmp_path / str(side), input=resized)
        with running(settings_for(model_path=model)) as client:
            assert client.get("/v1/model").json()["input"]["size"] == [side, side]
            masks.append(png_array(client.post("/v1/segment?format=png", files=upload(data)).content))
    assert masks[0].shape == masks[1].shape == (80, 96)
    assert not np.array_equal(masks[0], masks[1]), "a different input size changes what the model sees"


def test_measurements_without_cytoplasm_have_no_ratio() -> None:
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 1] = 2
    m = measure(mask, pixel_size_um=2.0)
    assert m.areas_px == {"nucleus": 1, "cytoplasm": 0, "cell": 1}
    assert m.nc_ratio is None
    assert m.areas_um2 == {"nucleus": 4.0, "cytoplasm": 0.0, "cell": 4.0}
    assert m.fractions["cell"] == pytest.approx(1 / 20)


@pytest.mark.parametrize("height", [1, 255, 256, 257, 600])
def test_the_overlay_png_holds_the_blend_in_any_memory_layout(height: int) -> None:
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, 90, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (height, 90)).astype(np.uint8)
    instances = (mask > 0).astype(np.uint16)
    colors = np.asarray(CLASS_COLORS, np.uint16)[mask]
    alpha = np.array([0, 96, 128], np.uint16)[mask][..., None]
    expected = ((image.astype(np.uint16) * (256 - alpha) + colors * alpha) >> 8).astype(np.uint8)
    inside = mask > 0
    edge = _inner_edges(mask)
    expected[edge & inside] = np.asarray(CLASS_COLORS, np.uint8)[mask][edge & inside]
    cell_edge = _inner_edges(instances)
    for layout in (image, np.asfortranarray(image)):
        drawn = png_array(encode_overlay_png(layout, mask))
        assert np.array_equal(drawn, expected)
        with_cells = png_array(encode_overlay_png(layout, mask, instances))
        assert (with_cells[cell_edge & inside] == CELL_OUTLINE).all()
        assert np.array_equal(with_cells[~(cell_edge & inside)], drawn[~(cell_edge & inside)])


def _inner_edges(ids: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another id."""
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:-1] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    return edge
