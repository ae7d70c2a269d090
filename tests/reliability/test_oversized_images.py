"""Images too large to decode are refused from their header (413), and refusing them costs the service
no memory worth the name: a PNG that only claims 30000×30000 pixels, and a real 20000×20000 one."""

from __future__ import annotations

import io

import httpx
import pytest
from corpus import real_grey_png
from live_process import ServiceProcess
from PIL import Image
from support.service import encode, raw_png, sample_rgb

from app.api.errors import PROBLEM_MEDIA_TYPE

MAX_GROWTH = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def real_20000() -> bytes:
    data = real_grey_png(20_000, 20_000)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # Pillow's own bomb guard, for this check
    try:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (20_000, 20_000)
            image.verify()  # every chunk and checksum in order: a real image, not only a header
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return data


def test_huge_images_are_refused_without_the_memory_to_decode_them(fresh_service: ServiceProcess,
                                                                   real_20000: bytes) -> None:
    claimed = raw_png(30_000, 30_000, 8, 2, b"\0" * 64)
    with httpx.Client(base_url=fresh_service.url, timeout=120) as client:
        # The working set of an ordinary request first, so that the growth measured is the big files'.
        assert client.post("/v1/segment", files={"file": ("a.png", encode(sample_rgb()))}).status_code == 200
        before = fresh_service.peak_rss()
        for name, data in (("claimed-30000.png", claimed), ("real-20000.png", real_20000)):
            response = client.post("/v1/segment", files={"file": (name, data)})
            assert response.status_code == 413, (name, response.text)
            assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
            assert "pixels" in response.json()["detail"]
            batch = client.post("/v1/segment/batch", files=[("files", (name, data))]).json()
            assert batch["results"][0]["error"]["status"] == 413
        growth = fresh_service.peak_rss() - before
    assert growth < MAX_GROWTH, f"peak memory grew by {growth / 2**20:.0f} MiB"
    assert fresh_service.live()
