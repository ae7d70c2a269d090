"""Limits (413), bad parameters (422), malformed bodies (400): every error is a problem document."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.service import encode, problem, raw_png, running, sample_rgb, upload

from app.api.settings import Settings
from model_training.synthetic import make_field


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return encode(np.full((8, 8, 3), 200, np.uint8))


def test_a_file_over_the_byte_limit_is_refused(settings_for: Callable[..., Settings],
                                                png_bytes: bytes) -> None:
    with running(settings_for(max_file_bytes=len(png_bytes) - 1)) as client:
        body = problem(client.post("/v1/segment", files=upload(png_bytes)), 413)
        assert str(len(png_bytes) - 1) in body["detail"]


def test_a_request_over_the_byte_limit_is_refused_before_it_is_read(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    with running(settings_for(max_request_bytes=1000)) as client:
        problem(client.post("/v1/segment", files=upload(png_bytes)), 413)


def test_a_streamed_request_without_length_is_cut_at_the_limit(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    boundary = "limit-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png_bytes + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1024):
            yield body[start:start + 1024]

    with running(settings_for(max_request_bytes=len(body) // 2)) as client:
        response = client.post("/v1/segment", content=chunks(),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        problem(response, 413)


def test_an_image_over_the_pixel_limit_is_refused(settings_for: Callable[..., Settings],
                                                  png_bytes: bytes) -> None:
    with running(settings_for(max_pixels=96 * 80 - 1)) as client:
        assert "pixels" in problem(client.post("/v1/segment", files=upload(png_bytes)), 413)["detail"]


def test_a_decompression_bomb_is_refused_from_its_header(client: TestClient) -> None:
    # 100000 × 100000 pixels claimed, a few bytes of data: decoding it would fail (422) or allocate
    # 30 GB; the header check refuses it first.
    bomb = raw_png(100_000, 100_000, 8, 2, b"\0" * 64)
    problem(client.post("/v1/segment", files=upload(bomb)), 413)


@pytest.fixture(scope="module")
def four_cells_png() -> bytes:
    """A field of four leukocytes side by side: four finder candidates."""
    cells = [(80 + 120 * i, 120, 36, [(80 + 120 * i, 120, 20)]) for i in range(4)]
    return encode(make_field(cells, size=(240, 560), red_cells=0, platelets=0)[0])


def test_an_image_with_more_leukocytes_than_allowed_is_refused_and_its_batch_neighbour_kept(
        settings_for: Callable[..., Settings], small_png: bytes, four_cells_png: bytes) -> None:
    with running(settings_for(max_cells=3)) as client:
        body = problem(client.post("/v1/segment", files=upload(four_cells_png)), 413)
        assert body["type"].endswith("too-many-cells") and "4 leukocyte candidates" in body["detail"]
        files = [("files", ("field.png", four_cells_png)), ("files", ("small.png", small_png))]
        results = client.post("/v1/segment/batch", files=files).json()["results"]
    assert results[0]["error"]["status"] == 413 and "areas_px" in results[1]


def test_the_files_of_a_batch_share_one_cell_budget(settings_for: Callable[..., Settings], small_png: bytes,
                                                      four_cells_png: bytes) -> None:
    files = [("files", ("a.png", four_cells_png)), ("files", ("b.png", four_cells_png)),
             ("files", ("small.png", small_png))]
    with running(settings_for(max_batch_cells=6)) as client:
        results = client.post("/v1/segment/batch", files=files).json()["results"]
    assert "cells" in results[0] and "cells" in results[2]  # 4 candidates drawn, 2 left
    assert results[1]["error"]["status"] == 413 and "what is left (2)" in results[1]["error"]["detail"]


def test_too_many_files_in_a_batch_are_refused(settings_for: Callable[..., Settings],
                                                small_png: bytes) -> None:
    with running(settings_for(max_files=2)) as client:
        # Past the limit by one or past the multipart parser's own default of 1000: the same 413.
        for count in (3, 1001):
            files = [("files", (f"{i}.png", small_png)) for i in range(count)]
            body = problem(client.post("/v1/segment/batch", files=files), 413)
            assert body["type"].endswith("too-many-files") and "limit is 2" in body["detail"], count
        assert client.post("/v1/segment/batch", files=files[:2]).status_code == 200


def test_a_file_over_the_limit_in_a_batch_fails_alone(settings_for: Callable[..., Settings], small_png: bytes,
                                                      png_bytes: bytes) -> None:
    with running(settings_for(max_file_bytes=len(small_png) + 10)) as client:
        files = [("files", ("small.png", small_png)), ("files", ("big.png", png_bytes))]
        body = client.post("/v1/segment/batch", files=files).json()
    assert body["failed"] == 1
    assert "areas_px" in body["results"][0]
    assert body["results"][1]["error"]["status"] == 413


@pytest.mark.parametrize("query", [
    "pixel_size_um=0", "pixel_size_um=-1", "pixel_size_um=nan", "pixel_size_um=inf", "pixel_size_um=abc",
    "pixel_size_um=1e308",
    "format=jpeg", "include_mask=maybe",
], ids=lambda q: q.replace("=", "-"))
def test_bad_query_parameters_are_refused(client: TestClient, png_bytes: bytes, query: str) -> None:
    body = problem(client.post(f"/v1/segment?{query}", files=upload(png_bytes)), 422)
    assert query.split("=")[0] in body["detail"]
    assert body["errors"][0]["loc"][0] == "query"


@pytest.mark.parametrize("query", ["format=png", "format=overlay", "pixel_size_um=0"], ids=str)
def test_bad_batch_query_parameters_are_refused(client: TestClient, png_bytes: bytes, query: str) -> None:
    problem(client.post(f"/v1/segment/batch?{query}", files=[("files", ("a.png", png_bytes))]), 422)


def test_a_request_without_the_file_field_is_refused(client: TestClient, png_bytes: bytes) -> None:
    problem(client.post("/v1/segment", files={"image": ("a.png", png_bytes)}), 422)
    problem(client.post("/v1/segment"), 422)
    problem(client.post("/v1/segment", json={"file": "a.png"}), 422)


def test_a_malformed_multipart_body_is_a_bad_request(client: TestClient) -> None:
    response = client.post("/v1/segment", content=b"--x\r\nbroken",
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code in (400, 422)
    problem(response, response.status_code)


def test_errors_never_leak_paths_or_versions(client: TestClient) -> None:
    body = problem(client.post("/v1/segment", files=upload(b"\x89PNG\r\n\x1a\nbroken")), 422)
    assert "/" not in body["detail"] and "Pillow" not in body["detail"]


def test_problem_types_tell_the_cases_apart(client: TestClient, png_bytes: bytes) -> None:
    unsupported = problem(client.post("/v1/segment", files=upload(b"text")), 415)
    corrupt = problem(client.post("/v1/segment", files=upload(b"\x89PNG\r\n\x1a\n")), 422)
    invalid = problem(client.post("/v1/segment?format=x", files=upload(png_bytes)), 422)
    assert len({unsupported["type"], corrupt["type"], invalid["type"]}) == 3


def test_sample_images_are_within_default_limits(client: TestClient) -> None:
    assert client.post("/v1/segment", files=upload(encode(sample_rgb(575, 575)))).status_code == 200
