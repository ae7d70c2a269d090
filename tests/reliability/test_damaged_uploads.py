"""Hundreds of damaged PNG, JPEG, BMP and TIFF files against the running service: each gets an answer, a
result or a problem document, never a server error or a dropped connection; the service stays up."""

from __future__ import annotations

import base64
from collections import Counter

import httpx
import pytest
from corpus import mutants
from live_process import ServiceProcess
from support.service import encode, sample_rgb

from app.api.errors import PROBLEM_MEDIA_TYPE

#: What a damaged file may get: a result (the damage missed what matters), too large (a header now
#: claims a huge image), not an image, or not decodable.
EXPECTED = {200, 413, 415, 422}


def post_each(client: httpx.Client, files: list[tuple[str, bytes]]) -> Counter[int]:
    statuses: Counter[int] = Counter()
    for name, data in files:
        response = client.post("/v1/segment", files={"file": (name, data)})
        assert response.status_code in EXPECTED, (name, response.status_code, response.text[:300])
        if response.status_code != 200:
            assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE), name
            assert response.json()["status"] == response.status_code, name
        statuses[response.status_code] += 1
    return statuses


def test_damaged_files_get_answers_and_never_a_server_error(service: ServiceProcess) -> None:
    corpus = mutants(count_per_format=80)
    assert len(corpus) >= 300
    with httpx.Client(base_url=service.url, timeout=60) as client:
        statuses = post_each(client, [(m.name, m.data) for m in corpus])
        assert client.get("/health/live").status_code == 200
        good = client.post("/v1/segment", files={"file": ("good.png", encode(sample_rgb()))})
        assert good.status_code == 200
    assert service.process is not None and service.process.poll() is None, "the process never restarted"
    # The corpus reaches every error path, and some damage leaves a decodable image.
    assert statuses[415] and statuses[422] and statuses[200], statuses


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_a_batch_of_damaged_files_answers_per_file(service: ServiceProcess, fmt: str) -> None:
    corpus = [m for m in mutants(count_per_format=80) if m.name.startswith(fmt.lower())][:40]
    with httpx.Client(base_url=service.url, timeout=120) as client:
        response = client.post("/v1/segment/batch?include_mask=true",
                               files=[("files", (m.name, m.data)) for m in corpus])
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["count"] == len(corpus)
    assert [r["filename"] for r in body["results"]] == [m.name for m in corpus]
    for result in body["results"]:
        if "error" in result:
            assert result["error"]["status"] in EXPECTED - {200}
        else:
            assert base64.b64decode(result["mask_png_base64"]).startswith(b"\x89PNG")
