"""Memory that a long request frees goes back to the system: buffers of a few hundred KiB (window inputs,
probability maps) made on a worker thread, between small objects that live on, are returned."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.api import observability
from app.api.metrics import Metrics

FREE_ON_A_THREAD = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import numpy as np

    def rss_mib():
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    from app.api.server import return_freed_memory

    kept = []

    def work():
        buffers = []
        for _ in range(400):
            buffers.append(np.ones(200 << 10, np.uint8))  # 200 KiB, written
            kept.append(bytes(1024))  # a small object that outlives the request
        before = rss_mib()
        buffers.clear()
        if sys.argv[1] == "trim":
            assert return_freed_memory()
        print(before - rss_mib())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
""")


def freed_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREE_ON_A_THREAD, mode], capture_output=True, text=True,
                         check=True, timeout=60, cwd=Path(__file__).resolve().parents[3]).stdout
    return float(out.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_freed_request_buffers_go_back_to_the_system() -> None:
    assert freed_mib("trim") > 70  # of the 80 MiB freed
    assert freed_mib("keep") < 40  # without it glibc keeps them on the thread's heap


@pytest.mark.parametrize(("seconds", "trims"), [(0.0, 0), (observability.TRIM_AFTER_S, 1)])
def test_only_a_long_request_is_followed_by_a_trim(monkeypatch: pytest.MonkeyPatch, seconds: float,
                                                   trims: int) -> None:
    calls: list[None] = []
    monkeypatch.setattr(observability, "return_freed_memory", lambda: calls.append(None))

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        return None

    middleware = observability.RequestContextMiddleware(slow_app, Metrics())
    scope = {"type": "http", "method": "POST", "path": "/v1/segment", "headers": []}
    asyncio.run(middleware(scope, send, send))
    assert len(calls) == trims
