"""`POST /v1/segment/batch`: order, per-file failures, JSON and ZIP."""

from __future__ import annotations

import base64
import csv
import io
import json
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.service import encode, png_array, sample_rgb, upload


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {"a.png": encode(sample_rgb(96, 80, seed=1)), "b.jpg": encode(sample_rgb(61, 77, seed=2), "JPEG"),
            "c.tif": encode(sample_rgb(120, 100, seed=3), "TIFF")}


def single(client: TestClient, name: str, data: bytes) -> dict[str, object]:
    body: dict[str, object] = client.post("/v1/segment", files=upload(data, name)).json()
    return body


def test_a_corrupt_file_fails_alone_and_the_order_is_kept(client: TestClient,
                                                         images: dict[str, bytes]) -> None:
    files = [("files", ("a.png", images["a.png"])), ("files", ("broken.png", b"\x89PNG\r\n\x1a\ncut")),
             ("files", ("b.jpg", images["b.jpg"])), ("files", ("notes.txt", b"hello")),
             ("files", ("c.tif", images["c.tif"]))]
    response = client.post("/v1/segment/batch", files=files)
    assert response.status_code == 200
    body = response.json()
    assert (body["count"], body["failed"]) == (5, 2)
    assert [r["filename"] for r in body["results"]] == [name for _, (name, _) in files]
    assert body["results"][1]["error"]["status"] == 422
    assert body["results"][3]["error"]["status"] == 415
    assert set(body["results"][1]["error"]) == {"status", "title", "detail"}
    for index, name in ((0, "a.png"), (2, "b.jpg"), (4, "c.tif")):
        alone = single(client, name, images[name])
        assert body["results"][index]["areas_px"] == alone["areas_px"], name
        assert (body["results"][index]["width"], body["results"][index]["height"]) == (alone["width"],
                                                                                        alone["height"])


def test_a_batch_of_only_bad_files_still_answers_per_file(client: TestClient) -> None:
    body = client.post("/v1/segment/batch", files=[("files", ("x", b"")), ("files", ("y", b"zz"))]).json()
    assert (body["count"], body["failed"]) == (2, 2)
    assert [r["error"]["status"] for r in body["results"]] == [422, 415]


def test_batch_json_can_include_masks_and_square_microns(client: TestClient,
                                                         images: dict[str, bytes]) -> None:
    files = [("files", (name, data)) for name, data in images.items()]
    body = client.post("/v1/segment/batch?include_mask=true&pixel_size_um=0.5", files=files).json()
    assert len(body["results"]) == len(images)
    for result in body["results"]:
        mask = png_array(base64.b64decode(result["mask_png_base64"]))
        assert mask.shape == (result["height"], result["width"])
        assert result["areas_px"]["nucleus"] == int((mask == 2).sum())
        assert result["areas_um2"]["cell"] == pytest.approx(result["areas_px"]["cell"] * 0.25)


def test_zip_holds_masks_overlays_csv_and_json(client: TestClient, images: dict[str, bytes]) -> None:
    files = [("files", (name, data)) for name, data in images.items()] + [("files", ("bad.png", b"x"))]
    response = client.post("/v1/segment/batch?format=zip&overlay=true&pixel_size_um=0.2", files=files)
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == sorted(
        [f"{s}_{kind}.png" for s in ("a", "b", "c") for kind in ("mask", "overlay", "instances")]
        + ["results.csv", "cells.csv", "results.json"])
    document = json.loads(archive.read("results.json"))
    assert (document["count"], document["failed"]) == (4, 1)
    rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
    assert [r["filename"] for r in rows] == ["a.png", "b.jpg", "c.tif", "bad.png"]
    assert rows[3]["error"].startswith("415") and rows[3]["mask"] == ""
    served = document["results"][0]["model"]
    assert [(r["model_name"], r["model_version"], r["tta"]) for r in rows] == \
        [(served["name"], served["version"], served["tta"])] * 3 + [("", "", "")]
    for row, name in zip(rows[:3], images, strict=False):
        mask = png_array(archive.read(row["mask"]))
        assert mask.shape == (int(row["height"]), int(row["width"]))
        assert int(row["area_nucleus_px"]) == int((mask == 2).sum())
        assert int(row["area_cell_px"]) == int((mask > 0).sum())
        assert float(row["area_cell_um2"]) == pytest.approx(int(row["area_cell_px"]) * 0.04)
        assert np.array_equal(mask, png_array(client.post("/v1/segment?format=png",
                                                          files=upload(images[name], name)).content))
        assert png_array(archive.read(row["mask"].replace("_mask", "_overlay"))).shape == (*mask.shape, 3)


def test_zip_without_overlay_holds_masks_only(client: TestClient, images: dict[str, bytes]) -> None:
    files = [("files", (name, data)) for name, data in images.items()]
    archive = zipfile.ZipFile(io.BytesIO(client.post("/v1/segment/batch?format=zip", files=files).content))
    assert not [n for n in archive.namelist() if "overlay" in n]
    assert len([n for n in archive.namelist() if n.endswith("_mask.png")]) == 3


def test_zip_gives_files_sharing_a_stem_distinct_safe_names(client: TestClient,
                                                            images: dict[str, bytes]) -> None:
    data = images["a.png"]
    names = ["cell.png", "cell.tif", "Cell.jpg", "../../etc/cell.png", "..png"]
    files = [("files", (name, data)) for name in names]
    archive = zipfile.ZipFile(io.BytesIO(client.post("/v1/segment/batch?format=zip", files=files).content))
    masks = [n for n in archive.namelist() if n.endswith("_mask.png")]
    assert len(masks) == len(names) == len({m.lower() for m in masks})
    assert all("/" not in m and "\\" not in m and not m.startswith(".") for m in masks)
    rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
    assert sorted(r["mask"] for r in rows) == sorted(masks)


def test_csv_keeps_spreadsheets_from_running_file_names(client: TestClient, images: dict[str, bytes]) -> None:
    files = [("files", ("=HYPERLINK(1).png", images["a.png"]))]
    archive = zipfile.ZipFile(io.BytesIO(client.post("/v1/segment/batch?format=zip", files=files).content))
    row = next(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
    assert row["filename"] == "'=HYPERLINK(1).png"
