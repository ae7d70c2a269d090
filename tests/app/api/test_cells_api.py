"""API v1.1 through HTTP with the shipped model: per-cell JSON, the 16-bit instance PNG, QuPath GeoJSON,
the batch ZIP's cells.csv, and the pixel size read from the file."""

from __future__ import annotations

import base64
import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from shapely.geometry import shape
from support.service import encode, png_array, running, upload

from app.api.settings import Settings
from model_training.synthetic import THREE_CELLS, make_field

SHIPPED = Path(__file__).resolve().parents[3] / "weights" / "model.onnx"


@pytest.fixture(scope="module")
def field_png() -> bytes:
    return encode(make_field(THREE_CELLS)[0])


@pytest.fixture
def shipped(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    with running(settings_for(model_path=SHIPPED)) as client:
        yield client


def test_json_lists_every_cell_and_keeps_the_v1_fields(shipped: TestClient, field_png: bytes) -> None:
    response = shipped.post("/v1/segment?include_mask=true", files=upload(field_png, "field.png"))
    body = response.json()
    assert response.headers["X-Cell-Count"] == "3" and body["cell_count"] == 3
    assert [c["id"] for c in body["cells"]] == [1, 2, 3]
    assert body["primary_cell_id"] is None
    assert (body["pixel_size_um"], body["pixel_size_source"], body["areas_um2"]) == (None, None, None)
    assert body["areas_px"]["cell"] == sum(c["areas_px"]["cell"] for c in body["cells"])
    assert sum(c["touches_border"] for c in body["cells"]) == 1
    mask = png_array(base64.b64decode(body["mask_png_base64"]))
    assert body["areas_px"]["nucleus"] == int((mask == 2).sum())


def test_instances_png_is_16_bit_with_the_cell_ids(shipped: TestClient, field_png: bytes) -> None:
    response = shipped.post("/v1/segment?format=instances", files=upload(field_png, "field.png"))
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.mode.startswith("I;16") and image.size == (640, 480)
        ids = np.asarray(image)
    cells = shipped.post("/v1/segment", files=upload(field_png)).json()["cells"]
    assert sorted(set(np.unique(ids)) - {0}) == [c["id"] for c in cells]
    for cell in cells:
        assert int((ids == cell["id"]).sum()) == cell["areas_px"]["cell"]
        x, y, w, h = cell["bbox"]
        ys, xs = np.nonzero(ids == cell["id"])
        assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)


def test_geojson_holds_valid_qupath_cell_objects(shipped: TestClient, field_png: bytes) -> None:
    response = shipped.post("/v1/segment?format=geojson&pixel_size_um=0.2", files=upload(field_png))
    assert response.headers["content-type"].startswith("application/geo+json")
    document = response.json()
    assert document["type"] == "FeatureCollection" and len(document["features"]) == 3
    for feature in document["features"]:
        assert feature["properties"]["objectType"] == "cell"
        cell, nucleus = shape(feature["geometry"]), shape(feature["nucleusGeometry"])
        assert feature["geometry"]["type"] == "Polygon" and cell.is_valid and nucleus.is_valid
        assert nucleus.difference(cell).area < 1e-6, "the nucleus lies inside its cell"
        measurements = feature["properties"]["measurements"]
        assert measurements["cell area px"] == pytest.approx(cell.area)
        assert measurements["cell area µm^2"] == pytest.approx(cell.area * 0.04)


def test_an_image_without_leukocytes_answers_zero_cells_not_a_guess(shipped: TestClient) -> None:
    empty = encode(make_field([], red_cells=30)[0])
    body = shipped.post("/v1/segment", files=upload(empty)).json()
    assert (body["cell_count"], body["cells"], body["primary_cell_id"]) == (0, [], None)
    assert body["areas_px"] == {"nucleus": 0, "cytoplasm": 0, "cell": 0}
    assert not png_array(shipped.post("/v1/segment?format=png", files=upload(empty)).content).any()
    assert shipped.post("/v1/segment?format=geojson", files=upload(empty)).json()["features"] == []


def test_batch_zip_adds_instance_masks_and_a_cells_table(shipped: TestClient, field_png: bytes) -> None:
    crop = encode(make_field([(60, 60, 40, [(60, 60, 22)])], size=(120, 120), red_cells=2)[0])
    files = [("files", ("field.png", field_png)), ("files", ("crop.png", crop)), ("files", ("bad.png", b"x"))]
    archive = zipfile.ZipFile(io.BytesIO(shipped.post("/v1/segment/batch?format=zip", files=files).content))
    assert {"field_instances.png", "crop_instances.png", "cells.csv"} <= set(archive.namelist())
    rows = list(csv.DictReader(io.StringIO(archive.read("cells.csv").decode())))
    assert [r["filename"] for r in rows].count("field.png") == 3
    crop_rows = [r for r in rows if r["filename"] == "crop.png"]
    assert len(crop_rows) == 1 and crop_rows[0]["primary"] == "True"
    results = {r["filename"]: r for r in csv.DictReader(io.StringIO(archive.read("results.csv").decode()))}
    assert results["field.png"]["cell_count"] == "3" and results["bad.png"]["error"].startswith("415")
    document = json.loads(archive.read("results.json"))
    assert [len(r.get("cells", [])) for r in document["results"]] == [3, 1, 0]


def tiff_with_resolution(image: np.ndarray, pixels_per_cm: float) -> bytes:
    buffer = io.BytesIO()
    tags = {282: pixels_per_cm, 283: pixels_per_cm, 296: 3}  # X/Y resolution, unit centimetre
    Image.fromarray(image).save(buffer, format="TIFF", tiffinfo=tags)
    return buffer.getvalue()


def test_pixel_size_comes_from_the_tiff_unless_the_request_gives_one(shipped: TestClient) -> None:
    image = make_field([(320, 240, 40, [(320, 240, 22)])])[0]
    data = tiff_with_resolution(image, 40000.0)  # 40,000 pixels per cm: 0.25 µm per pixel
    body = shipped.post("/v1/segment", files=upload(data, "field.tif")).json()
    assert (body["pixel_size_um"], body["pixel_size_source"]) == (pytest.approx(0.25), "file")
    cell = body["cells"][0]
    assert cell["areas_um2"]["cell"] == pytest.approx(cell["areas_px"]["cell"] * 0.0625)
    asked = shipped.post("/v1/segment?pixel_size_um=0.5", files=upload(data, "field.tif")).json()
    assert (asked["pixel_size_um"], asked["pixel_size_source"]) == (0.5, "request")
    plain = shipped.post("/v1/segment", files=upload(encode(image), "field.png")).json()
    assert (plain["pixel_size_um"], plain["pixel_size_source"]) == (None, None)


def test_ome_tiff_physical_size_is_read_with_its_unit(shipped: TestClient) -> None:
    image = make_field([(320, 240, 40, [(320, 240, 22)])])[0]
    ome = ('<?xml version="1.0" encoding="UTF-8"?>'
           '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
           '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="640" SizeY="480" SizeC="3" '
           'SizeZ="1" SizeT="1" PhysicalSizeX="200" PhysicalSizeXUnit="nm" PhysicalSizeY="200" '
           'PhysicalSizeYUnit="nm"/></Image></OME>')
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="TIFF", tiffinfo={270: ome})
    body = shipped.post("/v1/segment", files=upload(buffer.getvalue(), "field.ome.tif")).json()
    assert (body["pixel_size_um"], body["pixel_size_source"]) == (pytest.approx(0.2), "file")


def test_a_cell_diameter_hint_is_accepted_and_checked(shipped: TestClient, field_png: bytes) -> None:
    hinted = shipped.post("/v1/segment?cell_diameter_px=80", files=upload(field_png)).json()
    assert hinted["cell_count"] == 3
    assert shipped.post("/v1/segment?cell_diameter_px=-1", files=upload(field_png)).status_code == 422
