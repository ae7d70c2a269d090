"""Hostile input against a real `python -m app` process: every case gets a 4xx (or 200 for a legitimate
image) within seconds, the process's peak resident memory grows by less than 600 MB and is back within
150 MB of its start soon after; stalled and oversized connections are cut."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile import (
    flat_png,
    jpeg_claiming,
    oip_json_zeros,
    packed_field_jpeg,
    progressive_jpeg_with_repeated_scans,
    sixteen_bit_tiff,
    tiff_with_giant_tile,
)
from live_process import ServiceProcess, wait_until
from support.service import encode, sample_rgb

MIB = 1 << 20


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tiny_model_dir / "model.onnx", tmp_path_factory.mktemp("hostile"),
                             header_timeout_s=1.5, body_timeout_s=1.5, max_batch_pixels=30_000).start()
    yield process
    process.stop()


def rss(process: ServiceProcess) -> int:
    return process._status("VmRSS")


def reset_peak(process: ServiceProcess) -> None:
    """Let VmHWM restart from the current resident size (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")


CASES = {
    "1x40000000-png": ("/v1/segment", [("file", ("a.png", flat_png(40_000_000, 1)))], 413),
    "420000x10-png": ("/v1/segment", [("file", ("a.png", flat_png(420_000, 10)))], 413),
    "tiff-giant-tile": ("/v1/segment", [("file", ("a.tif", tiff_with_giant_tile()))], 422),
    "jpeg-1000-scans": ("/v1/segment", [("file", ("a.jpg", progressive_jpeg_with_repeated_scans()))], 422),
    # 1,600 leukocyte-like discs in 7.8 MP (the default WBC_MAX_CELLS is 500): refused after the finder.
    "packed-field-1600-cells": ("/v1/segment", [("file", ("a.jpg", packed_field_jpeg()))], 413),
    "16-bit-tiff-40mp": ("/v1/segment", [("file", ("a.tif", sixteen_bit_tiff()))], 200),
    "batch-of-36mp-claims": ("/v1/segment/batch?format=zip&overlay=true",
                             [("files", (f"{i}.jpg", jpeg_claiming(6000, 6000))) for i in range(4)], 200),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_file_is_refused_quickly_within_memory_bounds(guarded: ServiceProcess, case: str) -> None:
    path, files, status = CASES[case]
    start = rss(guarded)
    reset_peak(guarded)
    began = time.monotonic()
    response = httpx.post(guarded.url + path, files=files, timeout=60)
    seconds = time.monotonic() - began
    assert response.status_code == status, response.text[:500]
    assert seconds < 6, f"answered in {seconds:.1f} s"
    assert guarded.peak_rss() - start < 600 * MIB
    if case == "batch-of-36mp-claims":  # each file refused on its own, the request answered
        assert b"results.csv" in response.content
    assert wait_until(lambda: rss(guarded) - start < 150 * MIB, 5.0)


def test_90_mb_of_json_tensor_data_is_refused_before_parsing(guarded: ServiceProcess) -> None:
    # Open Inference Protocol: the image as a JSON list of 45 million ints. Parsed, it took +1.8 GB.
    name = httpx.get(guarded.url + "/v1/model", timeout=10).json()["name"]
    body = oip_json_zeros(45_000_000)
    start = rss(guarded)
    reset_peak(guarded)
    began = time.monotonic()
    response = httpx.post(f"{guarded.url}/v2/models/{name}/infer", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "binary" in response.json()["detail"]
    assert time.monotonic() - began < 6
    assert guarded.peak_rss() - start < 600 * MIB
    assert wait_until(lambda: rss(guarded) - start < 150 * MIB, 5.0)


@pytest.mark.parametrize("header", [b"Content-Length", b"Inference-Header-Content-Length"])
def test_an_announced_json_part_over_its_limit_is_refused_before_its_body_arrives(guarded: ServiceProcess,
                                                                                   header: bytes) -> None:
    name = httpx.get(guarded.url + "/v1/model", timeout=10).json()["name"]
    with socket.create_connection(("127.0.0.1", guarded.port)) as conn:
        length = b"90000000"
        conn.sendall(b"POST /v2/models/" + name.encode() + b"/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + length + b"\r\n" + header + b": "
                     + length + b"\r\n\r\n{")  # and nothing more: reading the body would wait for it
        conn.settimeout(1.0)  # under the process's 1.5 s body timeout, which would answer 408
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_batch_over_its_pixel_budget_keeps_the_results_of_the_files_before(guarded: ServiceProcess) -> None:
    image = encode(sample_rgb(96, 80))  # 7,680 px each; the budget is 30,000 px
    files = [("files", (f"{i}.png", image)) for i in range(5)]
    body = httpx.post(guarded.url + "/v1/segment/batch", files=files, timeout=60).json()
    statuses = [r.get("error", {}).get("status", 200) for r in body["results"]]
    assert statuses == [200, 200, 200, 413, 413]


def test_a_stalled_request_head_is_cut_while_others_are_served(guarded: ServiceProcess) -> None:
    stalled = socket.create_connection(("127.0.0.1", guarded.port))
    stalled.sendall(b"POST /v1/segm")  # half a request line, then nothing
    stalled.settimeout(10)
    began = time.monotonic()
    assert httpx.get(guarded.url + "/health/live", timeout=5).status_code == 200
    assert stalled.recv(1024) == b"", "the server closed the connection"
    assert time.monotonic() - began < 5
    stalled.close()


def test_unfinished_huge_headers_are_refused_without_holding_memory(guarded: ServiceProcess) -> None:
    start = rss(guarded)
    reset_peak(guarded)
    chunk = b"a" * MIB
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", guarded.port)) as conn:
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(30):  # 30 MB of one header line, never finished
                    conn.sendall(chunk)
            except OSError:
                pass  # refused and closed on the way: what should happen
    assert guarded.peak_rss() - start < 100 * MIB
    assert httpx.get(guarded.url + "/health/live", timeout=5).status_code == 200


def test_a_stalled_upload_is_cut_and_its_spool_removed(guarded: ServiceProcess) -> None:
    conn = socket.create_connection(("127.0.0.1", guarded.port))
    boundary = b"x1x2x3"
    head = (b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary
            + b"\r\nContent-Length: 50000000\r\n\r\n--" + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n')
    conn.sendall(head + b"\0" * (4 * MIB))  # part of a 50 MB body, then it stalls
    conn.settimeout(10)
    answer = conn.recv(4096)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert wait_until(lambda: not guarded.open_files_under(guarded.tmpdir), 5.0), "spooled files removed"


def test_a_normal_request_is_answered_soon_after_abandoned_uploads(slow_model_path: Path, tmp_path: Path,
                                                                   png_bytes: bytes) -> None:
    service = ServiceProcess(slow_model_path, tmp_path, max_batch_size=1).start()
    try:
        image = encode(sample_rgb(400, 400))
        boundary = b"b0undary"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n")
        for _ in range(4):  # sent whole, then the client goes away at once
            with socket.create_connection(("127.0.0.1", service.port)) as conn:
                conn.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                             b"boundary=" + boundary + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)
        time.sleep(0.2)
        began = time.monotonic()
        response = httpx.post(service.url + "/v1/segment", files={"file": ("b.png", png_bytes)}, timeout=60)
        seconds = time.monotonic() - began
        assert response.status_code == 200
        assert seconds < 4, f"answered in {seconds:.1f} s behind abandoned work"
    finally:
        service.stop()
