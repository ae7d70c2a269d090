"""Graceful shutdown of a real server process: requests in flight finish, then the process exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def test_sigterm_lets_requests_in_flight_finish_then_exits(slow_model_path: Path, png_bytes: bytes) -> None:
    port = _free_port()
    env = {**os.environ, "WBC_MODEL_PATH": str(slow_model_path), "WBC_MAX_BATCH_SIZE": "1",
           "WBC_INTRA_OP_THREADS": "1", "WBC_LOG_FORMAT": "json", "WBC_SHUTDOWN_TIMEOUT_S": "60"}
    server = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(f"{base}/health/ready").status_code == 200)
        outcome: dict[str, Any] = {}

        def segment() -> None:
            outcome["response"] = httpx.post(f"{base}/v1/segment", files={"file": ("a.png", png_bytes)},
                                             timeout=60)

        worker = threading.Thread(target=segment)
        worker.start()
        _wait_for(lambda: 'http_requests_in_progress{method="POST"} 1.0' in httpx.get(f"{base}/metrics").text)
        server.send_signal(signal.SIGTERM)
        worker.join(60)
        assert outcome["response"].status_code == 200
        assert outcome["response"].json()["areas_px"]["cell"] >= 0
        # uvicorn re-raises the signal once it has shut down, so the exit status says "ended by SIGTERM".
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
        _, stderr = server.communicate(timeout=10)
    assert "shutting down" in stderr
    assert stderr.index("shutting down") < stderr.index("model released")
