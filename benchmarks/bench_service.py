"""Service throughput and latency against the raw onnxruntime session, on the same images.

    .venv/bin/python benchmarks/bench_service.py                      # weights/model.onnx, examples/*.png
    .venv/bin/python benchmarks/bench_service.py --model M.onnx --images 'data/*.png' --pairs 9

Measures, in one run: the raw session in this process on preprocessed inputs (batch 1, and the
service's run size), the service per single request at concurrency 1 and 2, and the batch endpoint;
then, unless `--no-batching-study`, single requests at concurrency 1, 2 and 4 with micro-batching off
and at the defaults, and unless `--no-spinning-study`, onnxruntime's idle threads spinning or not.
Every comparison alternates its two sides in adjacent pairs and reports the median of the per-pair
ratios, so that a machine whose load drifts weighs on both alike. The service runs as
`python -m app` in a child process, as in production; the client sends prepared bodies over keep-alive
connections so as to take little CPU from it. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from app.config import Settings, available_cpus  # noqa: E402
from app.imaging import decode_image  # noqa: E402
from app.inference import CPU, InputTransform, batch_size_for, session_options  # noqa: E402
from app.interpolate import labels_at_size  # noqa: E402
from app.measure import measure  # noqa: E402
from app.model_meta import load_metadata  # noqa: E402
from benchmarks.service_client import (  # noqa: E402
    Server,
    Stats,
    bench_batch,
    bench_single,
    peak_rss_mib,
    timed,
)

Measure = Callable[[], Stats]


def load_images(patterns: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file matching the patterns, sorted."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit(f"no images match {' '.join(patterns)}")
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


class RawSession:
    """The model in this process: onnxruntime with the service's session options, no service around it."""

    def __init__(self, model: Path, settings: Settings, images: list[tuple[str, bytes]]) -> None:
        self.transform = InputTransform.from_metadata(load_metadata(model.with_name("model.json")))
        self.session = ort.InferenceSession(str(model), session_options(settings),
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.images = images
        self.tensors = [self.transform(decode_image(data, 10**9)) for _, data in images]

    def bench(self, count: int, batch: int) -> Stats:
        """`count` images in runs of `batch` (inputs stacked beforehand: only the runs are timed)."""
        inputs = [np.stack([self.tensors[(r * batch + i) % len(self.tensors)] for i in range(batch)])
                  for r in range(len(self.tensors))]
        self.session.run(None, {self.input: inputs[0]})
        latencies = []
        started = time.perf_counter()
        for r in range(max(1, count // batch)):
            x = inputs[r % len(inputs)]
            latencies.append(timed(lambda: self.session.run(None, {self.input: x})))  # noqa: B023
        return Stats(len(latencies) * batch, time.perf_counter() - started, latencies)


    def bench_pipeline(self, count: int) -> Stats:
        """`count` images, one at a time, through everything the service does to one outside HTTP:
        decode, preprocess, run, logits to a full-size mask, measure."""
        def one(data: bytes) -> None:
            image = decode_image(data, 10**9)
            logits = self.session.run(None, {self.input: self.transform(image)[None]})[0]
            measure(labels_at_size(logits[0], (image.height, image.width)))

        latencies = []
        started = time.perf_counter()
        for i in range(count):
            data = self.images[i % len(self.images)][1]
            latencies.append(timed(lambda: one(data)))  # noqa: B023
        return Stats(count, time.perf_counter() - started, latencies)


    def stage_costs(self, rounds: int = 10) -> dict[str, float]:
        """CPU milliseconds per image of each stage of the in-process pipeline, over every image."""
        spent: dict[str, float] = {}

        def clock(name: str, function: Callable[..., Any], *args: Any) -> Any:
            started = time.process_time()
            result = function(*args)
            spent[name] = spent.get(name, 0.0) + time.process_time() - started
            return result

        for _ in range(rounds):
            for _, data in self.images:
                image = clock("decode", decode_image, data, 10**9)
                x = clock("preprocess", self.transform, image)
                logits = clock("session run", self.session.run, None, {self.input: x[None]})[0]
                mask = clock("mask at full size", labels_at_size, logits[0], (image.height, image.width))
                clock("measure", measure, mask)
        count = rounds * len(self.images)
        return {name: seconds * 1000 / count for name, seconds in spent.items()}


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


def compare(args: argparse.Namespace, images: list[tuple[str, bytes]], settings: Settings) -> list[str]:
    """The raw session against the service at its defaults; Markdown lines."""
    raw = RawSession(args.model, settings, images)
    raw_peak = peak_rss_mib()
    costs = raw.stage_costs()
    chunk = min(batch_size_for(settings.max_batch_size, CPU), args.batch_files)
    n = args.requests
    with Server(args.model, {"WBC_LOG_LEVEL": "WARNING"}) as server:
        server.warm(images)
        modes: dict[str, tuple[int, Measure, Measure]] = {
            "single requests, concurrency 1": (1, lambda: raw.bench(n, 1),
                                               lambda: bench_single(server.url, images, n, 1)),
            "single requests, concurrency 1, against the in-process pipeline": (
                1, lambda: raw.bench_pipeline(n), lambda: bench_single(server.url, images, n, 1)),
            "single requests, concurrency 2": (1, lambda: raw.bench(n, 1),
                                               lambda: bench_single(server.url, images, n, 2)),
            f"batch endpoint, {args.batch_files} files a request": (
                chunk, lambda: raw.bench(n, chunk),
                lambda: bench_batch(server.url, images, n, args.batch_files)),
        }
        measured = {label: (batch, *paired(raw_side, service_side, args.pairs))
                    for label, (batch, raw_side, service_side) in modes.items()}
        server_peak = peak_rss_mib(server.pid)
    lines = ["| service | raw run size | raw img/s | service img/s | × raw | service p50 / p99 ms "
             "| raw p50 / p99 ms per run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, (batch, raws, services) in measured.items():
        lines.append(f"| {label} | {batch} | {median_throughput(raws):.1f} | "
                     f"{median_throughput(services):.1f} | {ratio(services, raws):.2f} | "
                     f"{latency(services)} | {latency(raws)} |")
    per_pair = "; ".join(f"{label}: " + ", ".join(f"{s.throughput / r.throughput:.2f}"
                                                  for r, s in zip(raws, services, strict=True))
                         for label, (_, raws, services) in measured.items())
    image_work = sum(v for k, v in costs.items() if k != "session run")
    stages = ["| stage | CPU ms per image |", "| --- | --- |",
              *(f"| {name} | {ms:.2f} |" for name, ms in costs.items()),
              "", f"Work on the image around the session run: {image_work:.1f} ms of CPU per image, "
              f"{image_work / costs['session run']:.0%} of the run's {costs['session run']:.1f} ms."]
    return [*lines, "", *stages, "", f"Peak resident memory: the raw session's process {raw_peak:.0f} MiB "
            f"(measured before any client work); the service's process {server_peak:.0f} MiB.", "",
            f"Service / raw in each pair: {per_pair}."]


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--images", nargs="+", default=[str(REPO / "examples" / "*.png")])
    parser.add_argument("--requests", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch-files", type=int, default=16, help="files per batch request")
    parser.add_argument("--pairs", type=int, default=7, help="alternations per comparison")
    parser.add_argument("--no-batching-study", dest="study", action="store_false")
    parser.add_argument("--no-spinning-study", dest="spinning", action="store_false")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    settings = Settings(model_path=args.model)
    meta = load_metadata(args.model.with_name("model.json"))
    report = [f"Model {meta.name} {meta.version} (`{args.model.name}`, input {meta.input.size}); "
              f"{len(images)} images ({', '.join(n for n, _ in images)}); {args.requests} images per "
              f"measurement, {args.pairs} pairs per comparison.",
              f"Machine: {platform.machine()}, {available_cpus()} CPUs available, load average "
              f"{os.getloadavg()[0]:.1f} at the start; onnxruntime {ort.__version__} on the CPU, "
              f"{settings.intra_op_threads} intra-op threads; service defaults on the CPU: max batch "
              f"{batch_size_for(settings.max_batch_size, CPU)}, max wait {settings.max_wait_ms:g} ms.", "",
              *compare(args, images, settings)]
    if args.study:
        study = batching_study(args, images, settings)
        report += ["", "Micro-batching off and on, single requests:", "", *study]
    if args.spinning:
        study = spinning_study(args, images, settings)
        report += ["", "onnxruntime's idle threads sleeping (the default) or spinning:", "", *study]
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
