"""The hostile inputs of tests/reliability against a service checkout, as a table: status, seconds and the
server process's peak resident memory growth per case, then stalled and oversized connections.

    .venv/bin/python benchmarks/bench_hostile.py                 # this checkout
    .venv/bin/python benchmarks/bench_hostile.py --repo /tmp/old # another checkout (its app/ is served)
    .venv/bin/python benchmarks/bench_hostile.py --only packed   # the cases whose name holds "packed"

Each case goes to the same `python -m app` process (tiny synthetic model exported on the fly is not
needed: the shipped model serves), one after another; VmHWM is reset through /proc/PID/clear_refs
before each case, so each row is that case's own peak.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # before tests/, whose app/ holds the tests of app/

import hostile  # noqa: E402  (tests/reliability/hostile.py: the inputs of the hostile suite)

MIB = 1 << 20


def status(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(key + ":"))


def start(repo: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WBC_")}
    env.update(WBC_MODEL_PATH=str(REPO / "weights" / "model.onnx"), WBC_LOG_LEVEL="WARNING",
               PYTHONPATH=str(repo))
    process = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the service did not become ready")


def cases() -> dict[str, tuple[str, list | bytes]]:
    return {
        "PNG 1 x 40,000,000 (39 kB)": ("/v1/segment", [("file", ("a.png", hostile.flat_png(40_000_000, 1)))]),
        "PNG 420,000 x 10 (4 kB)": ("/v1/segment", [("file", ("a.png", hostile.flat_png(420_000, 10)))]),
        "TIFF 256 x 256 with a 26,736 x 26,736 tile (150 B)": (
            "/v1/segment", [("file", ("a.tif", hostile.tiff_with_giant_tile()))]),
        "progressive JPEG, last scan x 1000": (
            "/v1/segment", [("file", ("a.jpg", hostile.progressive_jpeg_with_repeated_scans()))]),
        "batch of 4 JPEGs claiming 6000 x 6000 (632 B each), ZIP with overlays": (
            "/v1/segment/batch?format=zip&overlay=true",
            [("files", (f"{i}.jpg", hostile.jpeg_claiming(6000, 6000))) for i in range(4)]),
        "TIFF 6,300 x 6,300 (40 MP) 16-bit grey, deflate (118 kB)": (
            "/v1/segment", [("file", ("a.tif", hostile.sixteen_bit_tiff()))]),
        "JPEG 1,400 x 1,400 packed with 400 leukocyte-like discs": (
            "/v1/segment", [("file", ("a.jpg", hostile.packed_field_jpeg(2)))]),
        "JPEG 2,800 x 2,800 packed with 1,600 leukocyte-like discs": (
            "/v1/segment", [("file", ("a.jpg", hostile.packed_field_jpeg(4)))]),
        "JPEG 6,300 x 6,300 (40 MP) packed with 8,100 leukocyte-like discs": (
            "/v1/segment", [("file", ("a.jpg", hostile.packed_field_jpeg(9)))]),
        "OIP request whose JSON data lists 45 million zeros (90 MB)": (
            "/v2/models/{model}/infer", hostile.oip_json_zeros(45_000_000)),
        "batch of 64 JPEGs 700 x 700, each packed with 100 leukocyte-like discs": (
            "/v1/segment/batch", [("files", (f"{i}.jpg", hostile.packed_field_jpeg(1))) for i in range(64)]),
    }


def measure_files(url: str, pid: int, only: str | None) -> list[str]:
    rows = []
    model = httpx.get(url + "/v1/model", timeout=10).json()["name"]
    for name, (path, files) in cases().items():
        if only and only not in name:
            continue
        start_rss = status(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        began = time.monotonic()
        try:
            sent = {"content": files, "headers": {"Content-Type": "application/json"}} \
                if isinstance(files, bytes) else {"files": files}
            code = str(httpx.post(url + path.format(model=model), timeout=120, **sent).status_code)
        except httpx.HTTPError as exc:
            code = type(exc).__name__
        seconds = time.monotonic() - began
        peak = (status(pid, "VmHWM") - start_rss) / MIB
        time.sleep(5)
        kept = (status(pid, "VmRSS") - start_rss) / MIB
        rows.append(f"| {name} | {code} | {seconds:.1f} | {peak:+.0f} | {kept:+.0f} |")
    return rows


def measure_connections(port: int, pid: int) -> list[str]:
    rows = []
    start_rss = status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    held = []
    for _ in range(10):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(30):
                conn.sendall(b"a" * MIB)
        except OSError:
            pass
        held.append(conn)
    peak = (status(pid, "VmHWM") - start_rss) / MIB
    rows.append(f"| 10 connections x 30 MB of one unfinished header | peak {peak:+.0f} MiB |")
    for conn in held:
        conn.close()
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /v1/segm")
    stalled.settimeout(60)
    began = time.monotonic()
    try:
        closed = stalled.recv(10) == b""
    except TimeoutError:
        closed = False
    rows.append(f"| half a request line, then nothing | {'closed after ' if closed else 'still open after '}"
                f"{time.monotonic() - began:.0f} s |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--only", help="only the file cases whose name holds this text; no connection cases")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = start(args.repo, port)
    try:
        rows = measure_files(f"http://127.0.0.1:{port}", process.pid, args.only)
        conns = [] if args.only else measure_connections(port, process.pid)
    finally:
        process.terminate()
        process.wait(60)
    print(f"Checkout {args.repo}; load average {os.getloadavg()[0]:.1f}.\n")
    print("| case | status | seconds | peak RSS growth MiB | RSS growth 5 s later MiB |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if conns:
        print("\n| connection | result |\n| --- | --- |")
        print("\n".join(conns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
