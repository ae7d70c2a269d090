"""Service settings measured side by side: micro-batching on the CPU, and fp32 against the int8 default."""

from __future__ import annotations

import argparse

from app.api.settings import Settings
from benchmarks.service_client import (
    Server,
    bench_batch,
    bench_single,
    latency,
    median_throughput,
    paired,
    ratio,
)


def batching_study(args: argparse.Namespace, images: list[tuple[str, bytes]],
                   settings: Settings) -> list[str]:
    """Micro-batching off (max batch 1) and on (max batch 8), single requests; Markdown lines."""
    off = {"WBC_LOG_LEVEL": "WARNING", "WBC_MAX_BATCH_SIZE": "1", "WBC_MAX_WAIT_MS": "0"}
    on_env = {**off, "WBC_MAX_BATCH_SIZE": "8", "WBC_MAX_WAIT_MS": f"{settings.max_wait_ms:g}"}
    on = f"on (max batch 8, max wait {settings.max_wait_ms:g} ms)"
    lines = [f"| concurrency | off: img/s | off: p50 / p99 ms | {on}: img/s | on: p50 / p99 ms | on / off "
             "| images per run, on |", "| --- | --- | --- | --- | --- | --- | --- |"]
    with Server(args.model, off) as without, Server(args.model, on_env) as with_:
        without.warm(images)
        with_.warm(images)
        for c in (1, 2, 4):
            before = with_.runs()
            a, b = paired(lambda c=c: bench_single(without.url, images, args.requests, c),  # type: ignore[misc]
                          lambda c=c: bench_single(with_.url, images, args.requests, c),  # type: ignore[misc]
                          args.pairs)
            after = with_.runs()
            run_size = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            lines.append(f"| {c} | {median_throughput(a):.1f} | {latency(a)} | {median_throughput(b):.1f} | "
                         f"{latency(b)} | {ratio(b, a):.2f} | {run_size:.2f} |")
    return lines


def precision_study(args: argparse.Namespace, images: list[tuple[str, bytes]]) -> list[str]:
    """The service forced to fp32 (`WBC_PRECISION=fp32`) against its default (int8 on the CPU when the
    gated variant is there), single requests and batches; Markdown lines."""
    fp32 = {"WBC_LOG_LEVEL": "WARNING", "WBC_PRECISION": "fp32"}
    lines = ["| load | fp32: img/s | p50 / p99 ms | default: img/s | p50 / p99 ms | default / fp32 |",
             "| --- | --- | --- | --- | --- | --- |"]
    n = args.requests
    with Server(args.model, fp32) as forced, Server(args.model, {"WBC_LOG_LEVEL": "WARNING"}) as default:
        forced.warm(images)
        default.warm(images)
        loads = {f"single requests, concurrency {c}": (lambda c=c: bench_single(forced.url, images, n, c),
                                                       lambda c=c: bench_single(default.url, images, n, c))
                 for c in (1, 2)}
        loads[f"batch endpoint, {args.batch_files} files a request"] = (
            lambda: bench_batch(forced.url, images, n, args.batch_files),
            lambda: bench_batch(default.url, images, n, args.batch_files))
        for label, (first, second) in loads.items():
            a, b = paired(first, second, args.pairs)
            lines.append(f"| {label} | {median_throughput(a):.1f} | {latency(a)} | "
                         f"{median_throughput(b):.1f} | {latency(b)} | {ratio(b, a):.2f} |")
    return lines
