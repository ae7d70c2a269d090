"""Benchmark helpers: a service in a child process, and clients that time requests against it."""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process, in MiB; this process's without `pid`."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(action: Callable[[], Any]) -> float:
    """Seconds `action()` took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@dataclass
class Stats:
    """Images done in `seconds`, and the latency of each request (or run) in seconds."""

    images: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50) * 1000)

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1000)

    @classmethod
    def pool(cls, stats: list[Stats]) -> Stats:
        """All rounds as one: total images and time, every latency."""
        return cls(sum(s.images for s in stats), sum(s.seconds for s in stats),
                   [x for s in stats for x in s.latencies])


class Server:
    """`python -m app` on a free port with `WBC_*` overrides, ready on entry, stopped on exit."""

    def __init__(self, model: Path, env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "WBC_MODEL_PATH": str(model), **env}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__, the server's whole life)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port",
                                         str(self.port)], cwd=REPO, env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.process.poll() is not None:
                break
        self.log.seek(0)
        raise RuntimeError(f"the service did not become ready:\n{self.log.read().decode()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(60)
        self.log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def warm(self, images: list[tuple[str, bytes]]) -> None:
        """A few requests of each kind, so that no measurement pays a first-call cost."""
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for name, data in images * 2:
                client.post("/v1/segment", files={"file": (name, data)}).raise_for_status()

    def runs(self) -> tuple[float, float]:
        """Images inferred and session runs so far, from the service's metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        values = [re.search(rf"^wbc_inference_batch_size_{k} (\S+)$", text, re.M) for k in ("sum", "count")]
        images, runs = (float(v.group(1)) if v else 0.0 for v in values)
        return images, runs


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename, content) parts, and its content type."""
    boundary = "wbc-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
             for field, name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """A keep-alive HTTP/1.1 connection sending prepared bodies: as little client work as possible, so
    that the client does not take CPU from the service it measures."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def post(self, path: str, body: bytes, content_type: str) -> bytes:
        self.connection.request("POST", path, body, {"Content-Type": content_type})
        response = self.connection.getresponse()
        content = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {content[:200]!r}")
        return content

    def close(self) -> None:
        self.connection.close()


def run_together(loop: Callable[[int], Any], count: int) -> float:
    """Seconds for `count` threads running `loop(k)`, k = 0 … count − 1, all started together."""
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def bench_single(url: str, images: list[tuple[str, bytes]], count: int, concurrency: int) -> Stats:
    """`count` single-image requests (JSON answer) from `concurrency` clients, each in a loop."""
    bodies = [multipart([("file", name, data)]) for name, data in images]
    latencies: list[float] = []
    per_client = count // concurrency

    def client_loop(offset: int) -> None:
        client = Client(url)
        for i in range(per_client):
            body, content_type = bodies[(offset + i) % len(bodies)]
            started = time.perf_counter()
            client.post("/v1/segment", body, content_type)
            latencies.append(time.perf_counter() - started)
        client.close()

    return Stats(per_client * concurrency, run_together(client_loop, concurrency), latencies)


def bench_batch(url: str, images: list[tuple[str, bytes]], count: int, files_per_request: int) -> Stats:
    """`count` images sent to the batch endpoint, `files_per_request` at a time (JSON answer)."""
    requests = max(1, count // files_per_request)
    bodies = [multipart([("files", *images[(r * files_per_request + i) % len(images)])
                         for i in range(files_per_request)]) for r in range(len(images))]
    latencies: list[float] = []
    client = Client(url)
    started = time.perf_counter()
    for r in range(requests):
        body, content_type = bodies[r % len(bodies)]
        begun = time.perf_counter()
        answer = json.loads(client.post("/v1/segment/batch", body, content_type))
        latencies.append(time.perf_counter() - begun)
        if answer["failed"]:
            raise RuntimeError(f"{answer['failed']} files failed")
    seconds = time.perf_counter() - started
    client.close()
    return Stats(requests * files_per_request, seconds, latencies)


#: One measurement: run it, get its images, time and latencies.
Measure = Callable[[], "Stats"]


def paired(first: Measure, second: Measure, pairs: int) -> tuple[list[Stats], list[Stats]]:
    """`pairs` alternations of two measurements, so that each of one side's has a neighbour in time."""
    a, b = [], []
    for _ in range(pairs):
        a.append(first())
        b.append(second())
    return a, b


def ratio(measured: list[Stats], reference: list[Stats]) -> float:
    """Median over the pairs of measured / reference throughput."""
    return statistics.median(m.throughput / r.throughput for m, r in zip(measured, reference, strict=True))


def median_throughput(stats: list[Stats]) -> float:
    """Median images per second of the measurements."""
    return statistics.median(s.throughput for s in stats)


def latency(stats: list[Stats]) -> str:
    """`p50 / p99` in ms over every request (or run) of the measurements."""
    pooled = Stats.pool(stats)
    return f"{pooled.p50:.0f} / {pooled.p99:.0f}"
