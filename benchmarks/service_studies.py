"""Service settings measured side by side: inference workers, micro-batching, onnxruntime's spinning."""

from __future__ import annotations

import argparse

from app.config import Settings
from benchmarks.raw_session import RawSession
from benchmarks.service_client import (
    Server,
    bench_batch,
    bench_single,
    latency,
    median_throughput,
    paired,
    ratio,
)


def workers_study(args: argparse.Namespace, images: list[tuple[str, bytes]]) -> list[str]:
    """One inference worker (every run on all intra-op threads, one at a time) against the default
    (runs that overlap share the cores); Markdown lines."""
    one = {"WBC_LOG_LEVEL": "WARNING", "WBC_INFERENCE_WORKERS": "1"}
    lines = ["| load | one worker: img/s | p50 / p99 ms | default: img/s | p50 / p99 ms | default / one |",
             "| --- | --- | --- | --- | --- | --- |"]
    n = args.requests
    with Server(args.model, one) as single, Server(args.model, {"WBC_LOG_LEVEL": "WARNING"}) as default:
        single.warm(images)
        default.warm(images)
        loads = {f"single requests, concurrency {c}": (lambda c=c: bench_single(single.url, images, n, c),
                                                       lambda c=c: bench_single(default.url, images, n, c))
                 for c in (1, 2, 4)}
        loads[f"batch endpoint, {args.batch_files} files a request"] = (
            lambda: bench_batch(single.url, images, n, args.batch_files),
            lambda: bench_batch(default.url, images, n, args.batch_files))
        for label, (first, second) in loads.items():
            a, b = paired(first, second, args.pairs)
            lines.append(f"| {label} | {median_throughput(a):.1f} | {latency(a)} | "
                         f"{median_throughput(b):.1f} | {latency(b)} | {ratio(b, a):.2f} |")
    return lines


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


def spinning_study(args: argparse.Namespace, images: list[tuple[str, bytes]],
                   settings: Settings) -> list[str]:
    """onnxruntime's idle threads spinning or sleeping: the raw session, and the service at concurrency 2."""
    spinning = settings.model_copy(update={"ort_spinning": True})
    sleeping = settings.model_copy(update={"ort_spinning": False})
    raw_sleep, raw_spin = RawSession(args.model, sleeping, images), RawSession(args.model, spinning, images)
    n = args.requests
    lines = ["| measured | sleeping: img/s | spinning: img/s | spinning / sleeping |",
             "| --- | --- | --- | --- |"]
    a, b = paired(lambda: raw_sleep.bench(n, 1), lambda: raw_spin.bench(n, 1), args.pairs)
    lines.append(f"| raw session, batch 1 | {median_throughput(a):.1f} | {median_throughput(b):.1f} | "
                 f"{ratio(b, a):.2f} |")
    with Server(args.model, {"WBC_LOG_LEVEL": "WARNING", "WBC_ORT_SPINNING": "false"}) as off, \
            Server(args.model, {"WBC_LOG_LEVEL": "WARNING", "WBC_ORT_SPINNING": "true"}) as on:
        off.warm(images)
        on.warm(images)
        a, b = paired(lambda: bench_single(off.url, images, n, 2), lambda: bench_single(on.url, images, n, 2),
                      args.pairs)
    lines.append(f"| service, single requests, concurrency 2 | {median_throughput(a):.1f} | "
                 f"{median_throughput(b):.1f} | {ratio(b, a):.2f} |")
    return lines
