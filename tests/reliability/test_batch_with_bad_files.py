"""A batch with several bad files among good ones returns every good result, the same as alone."""

from __future__ import annotations

import httpx
from corpus import mutants
from live_process import ServiceProcess
from support.service import encode, raw_png, sample_rgb


def test_every_good_result_comes_back_between_bad_files(service: ServiceProcess) -> None:
    good = {"a.png": encode(sample_rgb(96, 80, seed=11)),
            "b.jpg": encode(sample_rgb(70, 64, seed=12), "JPEG"),
            "c.bmp": encode(sample_rgb(50, 90, seed=13), "BMP"),
            "d.tif": encode(sample_rgb(64, 64, seed=14), "TIFF")}
    truncated = next(m for m in mutants() if m.name.startswith("png") and "truncated" in m.name)
    bad = {"empty.png": b"", "notes.txt": b"not an image", "cut.png": truncated.data,
           "bomb.png": raw_png(30_000, 30_000, 8, 2, b"\0" * 64), "half.jpg": good["b.jpg"][:200]}
    order = ["empty.png", "a.png", "notes.txt", "cut.png", "b.jpg", "bomb.png", "c.bmp", "half.jpg", "d.tif"]
    files = {**good, **bad}
    with httpx.Client(base_url=service.url, timeout=120) as client:
        body = client.post("/v1/segment/batch", files=[("files", (n, files[n])) for n in order]).json()
        alone = {n: client.post("/v1/segment", files={"file": (n, good[n])}).json() for n in good}
    assert (body["count"], body["failed"]) == (len(order), len(bad))
    results = dict(zip(order, body["results"], strict=True))
    for name in good:
        assert results[name]["areas_px"] == alone[name]["areas_px"], name
        assert results[name]["width"] == alone[name]["width"], name
        assert results[name]["height"] == alone[name]["height"], name
    assert {n: results[n]["error"]["status"] for n in bad} == {
        "empty.png": 422, "notes.txt": 415, "cut.png": 422, "bomb.png": 413, "half.jpg": 422}
