"""A burst of about five times what the service can hold, from a separate process on loopback: every
request gets 200 or 503 with `Retry-After`, accepted ones finish, and liveness keeps answering."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from live_process import ServiceProcess

from app.api.errors import PROBLEM_MEDIA_TYPE

BURST = Path(__file__).with_name("burst.py")
QUEUE_SIZE, MAX_BATCH = 2, 1
#: Requests the service can hold at once: the queue plus the run in progress.
CAPACITY = QUEUE_SIZE + MAX_BATCH
CLIENT_TIMEOUT_S = 120


def test_a_burst_gets_only_200_and_503_while_live_answers(slow_model_path: Path, png_bytes: bytes,
                                                          tmp_path: Path) -> None:
    service = ServiceProcess(slow_model_path, tmp_path, max_batch_size=MAX_BATCH, queue_size=QUEUE_SIZE,
                             max_wait_ms=0, retry_after_s=2).start()
    image = tmp_path / "cell.png"
    image.write_bytes(png_bytes)
    live: list[bool] = []
    try:
        burst = subprocess.Popen([sys.executable, str(BURST), service.url, str(image), str(5 * CAPACITY),
                                  str(CLIENT_TIMEOUT_S)], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + CLIENT_TIMEOUT_S + 60
        while burst.poll() is None and time.monotonic() < deadline:
            live.append(service.live(timeout_s=10))
            time.sleep(0.1)
        output, _ = burst.communicate(timeout=60)
        rc = service.stop()
    finally:
        service.stop()
    results = json.loads(output)
    assert len(results) == 5 * CAPACITY
    assert [r for r in results if r["error"]] == [], "every request got an answer within the timeout"
    statuses = [r["status"] for r in results]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= CAPACITY
    for rejected in (r for r in results if r["status"] == 503):
        assert rejected["retry_after"] == "2"
        assert rejected["content_type"].startswith(PROBLEM_MEDIA_TYPE)
    assert live and all(live), f"{live.count(False)} of {len(live)} liveness probes failed"
    assert rc == 0
