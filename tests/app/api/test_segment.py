"""`POST /v1/segment`: formats, mask geometry, measurements and units."""

from __future__ import annotations

import base64
import io
import re

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.service import encode, png_array, sample_rgb, upload


def test_json_reports_areas_fractions_ratio_and_model(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/v1/segment", files=upload(png_bytes))
    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == "cell.png"
    assert (body["width"], body["height"]) == (96, 80)
    areas = body["areas_px"]
    assert areas["cell"] == areas["nucleus"] + areas["cytoplasm"]
    assert body["fractions"]["cell"] == pytest.approx(areas["cell"] / (96 * 80), abs=1e-6)
    assert body["nc_ratio"] == pytest.approx(areas["nucleus"] / areas["cytoplasm"], abs=1e-6)
    assert body["areas_um2"] is None
    assert body["model"] == {"name": "wbc-tiny", "version": "0.0.1", "tta": "none"}
    assert body["inference_ms"] > 0
    assert "mask_png_base64" not in body


def test_json_areas_equal_the_png_masks_pixel_counts(client: TestClient, png_bytes: bytes) -> None:
    areas = client.post("/v1/segment", files=upload(png_bytes)).json()["areas_px"]
    mask = png_array(client.post("/v1/segment?format=png", files=upload(png_bytes)).content)
    counts = np.bincount(mask.ravel(), minlength=3)
    assert areas == {"nucleus": counts[2], "cytoplasm": counts[1], "cell": counts[1] + counts[2]}
    assert min(counts) > 0, "the tiny model's masks hold every class, so the counts mean something"


def test_included_mask_is_the_same_as_the_png_format(client: TestClient, png_bytes: bytes) -> None:
    body = client.post("/v1/segment?include_mask=true", files=upload(png_bytes)).json()
    embedded = png_array(base64.b64decode(body["mask_png_base64"]))
    direct = png_array(client.post("/v1/segment?format=png", files=upload(png_bytes)).content)
    assert np.array_equal(embedded, direct)


def test_png_is_an_8_bit_palette_mask_of_class_ids_with_areas_in_headers(client: TestClient,
                                                                         png_bytes: bytes) -> None:
    response = client.post("/v1/segment?format=png", files=upload(png_bytes))
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.mode == "P"
        assert image.size == (96, 80)
        palette = image.getpalette()
        assert palette is not None
        colors = {tuple(palette[3 * i:3 * i + 3]) for i in range(3)}
        assert len(colors) == 3, "each class has its own colour"
    assert response.content[24] == 8, "bit depth 8 in the IHDR chunk"
    mask = png_array(response.content)
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert int(response.headers["X-Area-Nucleus-Px"]) == int((mask == 2).sum())
    assert int(response.headers["X-Area-Cytoplasm-Px"]) == int((mask == 1).sum())
    assert int(response.headers["X-Area-Cell-Px"]) == int((mask > 0).sum())


def test_overlay_is_an_rgb_png_of_the_input_size_that_differs_from_the_input(client: TestClient) -> None:
    image = sample_rgb(96, 80)
    response = client.post("/v1/segment?format=overlay", files=upload(encode(image)))
    assert response.headers["content-type"] == "image/png"
    drawn = png_array(response.content)
    assert drawn.shape == (80, 96, 3)
    mask = png_array(client.post("/v1/segment?format=png", files=upload(encode(image))).content)
    changed = np.any(drawn != image, axis=2)
    assert changed[mask > 0].mean() > 0.9, "cell pixels are drawn over"
    # Cell numbers may stand a few pixels over the edge of small cells; farther out nothing changes.
    near = cv2.dilate((mask > 0).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    assert not changed[~near].any(), "background away from the cells stays as it was"


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 3), (101, 57), (333, 211), (64, 64)],
                         ids=["1x1", "7x3", "101x57", "333x211", "model-size"])
def test_mask_has_the_inputs_exact_size(client: TestClient, width: int, height: int) -> None:
    image = sample_rgb(max(width, 8), max(height, 8))[:height, :width]
    response = client.post("/v1/segment?format=png", files=upload(encode(image)))
    assert response.status_code == 200
    assert png_array(response.content).shape == (height, width)


@pytest.mark.parametrize("pixel_size", [0.1, 0.25, 1.5], ids=["0.1um", "0.25um", "1.5um"])
def test_square_microns_are_pixels_times_pixel_area(client: TestClient, png_bytes: bytes,
                                                    pixel_size: float) -> None:
    body = client.post(f"/v1/segment?pixel_size_um={pixel_size}", files=upload(png_bytes)).json()
    for region, pixels in body["areas_px"].items():
        assert body["areas_um2"][region] == pytest.approx(pixels * pixel_size**2)


def test_same_image_gives_the_same_mask_whatever_the_file_name(client: TestClient, png_bytes: bytes) -> None:
    a = client.post("/v1/segment?format=png", files=upload(png_bytes, "a.png")).content
    b = client.post("/v1/segment?format=png", files=upload(png_bytes, "dir/b.jpg")).content
    assert a == b


def test_client_paths_are_reduced_to_the_file_name(client: TestClient, png_bytes: bytes) -> None:
    body = client.post("/v1/segment", files=upload(png_bytes, "C:\\fakepath\\cell 7.png")).json()
    assert body["filename"] == "cell 7.png"
    response = client.post("/v1/segment?format=png", files=upload(png_bytes, 'a"b\r\nX: y.png'))
    assert response.status_code == 200
    disposition = response.headers["content-disposition"]
    assert re.fullmatch(r'inline; filename="[A-Za-z0-9._-]+_mask\.png"', disposition)
