"""Faults from outside: clients that vanish mid-upload, and SIGTERM while requests are in flight."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_process import ServiceProcess, wait_until
from support.service import encode, sample_rgb

CLIENTS = 50
#: Declared upload size, and how much of it each client sends before it goes: past the 1 MiB that the
#: multipart parser keeps in memory, so every upload has a temporary file on disk when its client leaves.
DECLARED, SENT = 4 * 1024 * 1024, 1536 * 1024


def _half_upload(url: str, abort: bool) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    boundary = "vanishing-client"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Length: {DECLARED}\r\n"
                 f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + head)
    sock.sendall(b"\x89PNG\r\n\x1a\n" + os.urandom(SENT))
    if abort:  # a reset instead of an orderly close, as a crashed client or a dropped link would leave
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def _segment(service: ServiceProcess) -> int:
    response = httpx.post(f"{service.url}/v1/segment", files={"file": ("a.png", encode(sample_rgb()))},
                          timeout=60)
    return response.status_code


@pytest.mark.slow
def test_clients_vanishing_mid_upload_leave_no_files_or_threads(fresh_service: ServiceProcess) -> None:
    assert _segment(fresh_service) == 200
    threads_before = fresh_service.threads()
    files_before = set(fresh_service.tmpdir.iterdir())  # onnxruntime keeps a small file of its own there
    sockets = [_half_upload(fresh_service.url, abort=i % 2 == 1) for i in range(CLIENTS)]
    # The uploads really reached the disk: the test would prove nothing if they had stayed in memory.
    assert wait_until(lambda: fresh_service.open_files_under(fresh_service.tmpdir), 30)
    for sock in sockets:
        sock.close()
    assert wait_until(lambda: not fresh_service.open_files_under(fresh_service.tmpdir), 30), \
        fresh_service.open_files_under(fresh_service.tmpdir)
    assert set(fresh_service.tmpdir.iterdir()) == files_before
    assert fresh_service.live() and _segment(fresh_service) == 200
    # Idle worker threads end after 10 s, when the next job looks for a worker; a request each poll.
    assert wait_until(lambda: _segment(fresh_service) == 200 and fresh_service.threads() <= threads_before,
                      60, interval_s=2), (fresh_service.threads(), threads_before)


def _in_flight(service: ServiceProcess) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    match = re.search(r'^http_requests_in_progress\{method="POST"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_sigterm_lets_every_request_in_flight_finish_and_exits_0(slow_model_path: Path, png_bytes: bytes,
                                                                 tmp_path: Path) -> None:
    service = ServiceProcess(slow_model_path, tmp_path, max_batch_size=1, queue_size=16,
                             shutdown_timeout_s=60).start()
    responses: list[Any] = []

    def segment(i: int) -> None:
        responses.append(httpx.post(f"{service.url}/v1/segment", files={"file": (f"{i}.png", png_bytes)},
                                    timeout=120))

    workers = [threading.Thread(target=segment, args=(i,)) for i in range(4)]
    try:
        for worker in workers:
            worker.start()
        assert wait_until(lambda: _in_flight(service) == 4, 60, interval_s=0.05)
        service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for worker in workers:
            worker.join(120)
        # The one SIGTERM must be enough: wait for the exit rather than signal again (a second signal
        # landing while the interpreter finalises would kill it regardless of the service).
        rc = service.process.wait(90)  # type: ignore[union-attr]
    finally:
        service.stop()
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["areas_px"]["cell"] >= 0 for r in responses)
    assert rc == 0, service.log()[-2000:]
