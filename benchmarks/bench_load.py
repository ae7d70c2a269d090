"""The service under concurrent load: requests and images per second and p50/p95/p99 latency at
concurrency 1, 2, 8 and 32, for `/v1/segment` and `/v1/segment/batch`, with micro-batching on and off,
against the raw onnxruntime session; and the peak resident memory of each service process.

    .venv/bin/python benchmarks/bench_load.py                         # weights/model.onnx, examples/*.png
    .venv/bin/python benchmarks/bench_load.py --model M.onnx --rounds 3 --json runs/bench-load/result.json

Two services run at once as `python -m app` on loopback ports: micro-batching on
(`WBC_MAX_BATCH_SIZE=8`, `WBC_MAX_WAIT_MS=5`) and off (`WBC_MAX_BATCH_SIZE=1`). Measurements take turns
between them and the raw session round after round, so that a busy machine weighs on every mode alike;
each measurement is bounded in requests (`--images`) and in time (`--budget-s`). Complements
`bench_service.py`, which compares the service with the raw session at its default settings and studies
the batching parameters.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.raw_session import RawSession  # noqa: E402
from benchmarks.service_client import Server, multipart, peak_rss_mib, run_together  # noqa: E402

CONCURRENCY = (1, 2, 8, 32)
#: Micro-batching on (runs of up to 8 images, waiting up to 5 ms for company) and off.
MODES = {"on": {"WBC_MAX_BATCH_SIZE": "8", "WBC_MAX_WAIT_MS": "5"}, "off": {"WBC_MAX_BATCH_SIZE": "1"}}


@dataclass
class Load:
    """Outcome of one measurement: images done, wall time, latency of every answered request, statuses."""

    images: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def drive(url: str, path: str, bodies: list[tuple[bytes, str]], images_per_request: int, concurrency: int,
          images: int, budget_s: float) -> Load:
    """`concurrency` keep-alive clients posting `bodies` in turn until `images` are done or `budget_s`
    passed.

    Every status is counted (a 503 is an answer, not an error); only 200s count as images done.
    """
    host, port = url.removeprefix("http://").split(":")
    requests_per_client = max(2, -(-images // (images_per_request * concurrency)))
    deadline = time.monotonic() + budget_s
    load, lock = Load(), threading.Lock()

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        for i in range(requests_per_client):
            if time.monotonic() > deadline:
                break
            body, content_type = bodies[(offset + i) % len(bodies)]
            started = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                load.latencies.append(elapsed)
                load.statuses[response.status] = load.statuses.get(response.status, 0) + 1
                load.images += images_per_request if response.status == 200 else 0
        connection.close()

    load.seconds = run_together(client, concurrency)
    return load


def raw_load(raw: RawSession, batch: int, images: int, budget_s: float) -> Load:
    """The raw session in runs of `batch` until `images` are done or `budget_s` passed."""
    inputs = np.stack([raw.tensors[i % len(raw.tensors)] for i in range(batch)])
    raw.session.run(None, {raw.input: inputs})
    load = Load()
    deadline = time.monotonic() + budget_s
    started = time.perf_counter()
    while load.images < images and time.monotonic() < deadline:
        began = time.perf_counter()
        raw.session.run(None, {raw.input: inputs})
        load.latencies.append(time.perf_counter() - began)
        load.images += batch
    load.seconds = time.perf_counter() - started
    return load


def measure(args: argparse.Namespace, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Every (endpoint, concurrency, mode) and the raw session, interleaved over `args.rounds` rounds."""
    single = [multipart([("file", name, data)]) for name, data in files]
    batch = [multipart([("files", *files[(r + i) % len(files)]) for i in range(args.batch_files)])
             for r in range(len(files))]
    raw = RawSession(args.model, files)
    results: dict[str, list[Load]] = {}
    env = {"WBC_LOG_LEVEL": "WARNING"}
    with Server(args.model, {**env, **MODES["on"]}) as on, Server(args.model, {**env, **MODES["off"]}) as off:
        servers = {"on": on, "off": off}
        for server in servers.values():
            server.warm(files)
        for _ in range(args.rounds):
            for b in sorted({1, int(MODES["on"]["WBC_MAX_BATCH_SIZE"]), args.batch_files}):
                results.setdefault(f"raw|{b}", []).append(raw_load(raw, b, args.images, args.budget_s))
            for c in args.concurrency:
                for mode, server in servers.items():
                    results.setdefault(f"single|{c}|{mode}", []).append(
                        drive(server.url, "/v1/segment", single, 1, c, args.images, args.budget_s))
                    results.setdefault(f"batch|{c}|{mode}", []).append(
                        drive(server.url, "/v1/segment/batch", batch, args.batch_files, c, args.images,
                              args.budget_s))
        rss = {mode: peak_rss_mib(server.pid) for mode, server in servers.items()}
    rss["raw"] = peak_rss_mib()
    return {"results": results, "peak_rss_mib": rss}


def summarize(loads: list[Load]) -> dict[str, Any]:
    """Median throughput over rounds; latency percentiles over every request of every round."""
    pooled = Load(latencies=[x for load in loads for x in load.latencies])
    statuses: dict[int, int] = {}
    for load in loads:
        for status, n in load.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    return {"images_per_s": statistics.median(x.images_per_s for x in loads),
            "requests_per_s": statistics.median(x.requests_per_s for x in loads),
            "p50_ms": pooled.percentile(50), "p95_ms": pooled.percentile(95),
            "p99_ms": pooled.percentile(99),
            "statuses": statuses, "rounds": [round(x.images_per_s, 2) for x in loads]}


def render(report: dict[str, Any]) -> str:
    """Markdown: the raw session, then every endpoint × concurrency × mode with its ratio to raw batch 1."""
    rows = report["summary"]
    raw1 = rows["raw|1"]["images_per_s"]
    lines = [f"{report['date']}, load average {report['load_before']} before, {report['load_after']} after; "
             f"{report['cpus']} CPUs, {report['rounds']} rounds, ≤ {report['images']} images and "
             f"≤ {report['budget_s']:g} s per measurement", "",
             "| what | concurrency | micro-batching | req/s | img/s | × raw b1 | p50 ms | p95 ms | p99 ms | "
             "statuses |", "|" + " --- |" * 10]
    for key, s in rows.items():
        parts = key.split("|")
        if parts[0] == "raw":
            what, c, mode = f"raw session, batch {parts[1]}", "", ""
        else:
            what = ("/v1/segment" if parts[0] == "single"
                    else f"/v1/segment/batch ({report['batch_files']} files)")
            c, mode = parts[1], parts[2]
        statuses = ", ".join(f"{k}×{v}" for k, v in sorted(s["statuses"].items()))
        lines.append(f"| {what} | {c} | {mode} | {s['requests_per_s']:.1f} | {s['images_per_s']:.1f} | "
                     f"{s['images_per_s'] / raw1:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
                     f"{s['p99_ms']:.0f} | {statuses} |")
    rss = report["peak_rss_mib"]
    lines += ["", f"Peak resident memory (VmHWM): service with micro-batching {rss['on']:.0f} MiB, "
              f"without {rss['off']:.0f} MiB; raw session process {rss['raw']:.0f} MiB."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--images-glob", default=str(REPO / "examples" / "*.png"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--images", type=int, default=48, help="images per measurement, at most")
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds per measurement, at most")
    parser.add_argument("--batch-files", type=int, default=8, help="files per batch request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    files = [(Path(p).name, Path(p).read_bytes()) for p in sorted(glob.glob(args.images_glob))]
    if not files:
        raise SystemExit(f"no images match {args.images_glob}")
    load_before = "/".join(f"{v:.2f}" for v in os.getloadavg())
    measured = measure(args, files)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "cpus": len(os.sched_getaffinity(0)), "load_before": load_before,
              "load_after": "/".join(f"{v:.2f}" for v in os.getloadavg()),
              "rounds": args.rounds, "images": args.images, "budget_s": args.budget_s,
              "batch_files": args.batch_files, "model": str(args.model), "files": [n for n, _ in files],
              "modes": MODES,
              "peak_rss_mib": measured["peak_rss_mib"],
              "summary": {k: summarize(v) for k, v in measured["results"].items()}}
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
