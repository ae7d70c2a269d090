"""Sends COUNT single-image requests to a service all at once and prints what came back, as JSON.

    python tests/reliability/burst.py URL IMAGE COUNT TIMEOUT_S

Run as a process of its own by the overload test, so that the client's work does not share the test
process (or its interpreter lock) with anything that watches the service.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def send(url: str, data: bytes, timeout_s: float, index: int, out: list[dict[str, Any]],
         start: threading.Event) -> None:
    start.wait()
    began = time.monotonic()
    try:
        response = httpx.post(f"{url}/v1/segment", files={"file": (f"{index}.png", data)}, timeout=timeout_s)
        out[index] = {"status": response.status_code, "retry_after": response.headers.get("retry-after"),
                      "content_type": response.headers.get("content-type"), "error": None}
    except httpx.HTTPError as exc:
        out[index] = {"status": None, "error": repr(exc)}
    out[index]["seconds"] = time.monotonic() - began


def main(argv: list[str]) -> int:
    url, image, count, timeout_s = argv[0], Path(argv[1]).read_bytes(), int(argv[2]), float(argv[3])
    results: list[dict[str, Any]] = [{} for _ in range(count)]
    start = threading.Event()
    threads = [threading.Thread(target=send, args=(url, image, timeout_s, i, results, start))
               for i in range(count)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join(timeout_s + 30)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
