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
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402

from app.config import Settings, available_cpus  # noqa: E402
from app.inference import CPU, batch_size_for, inference_workers_for  # noqa: E402
from app.model_meta import load_metadata  # noqa: E402
from benchmarks.raw_session import RawSession  # noqa: E402
from benchmarks.service_client import (  # noqa: E402
    Measure,
    Server,
    bench_batch,
    bench_single,
    latency,
    median_throughput,
    paired,
    peak_rss_mib,
    ratio,
)
from benchmarks.service_studies import batching_study, spinning_study, workers_study  # noqa: E402


def load_images(patterns: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file matching the patterns, sorted."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit(f"no images match {' '.join(patterns)}")
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


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
            "single requests, concurrency 2, against two one-thread runs side by side": (
                1, lambda: raw.bench_side_by_side(n, 2), lambda: bench_single(server.url, images, n, 2)),
            f"batch endpoint, {args.batch_files} files a request, against two one-thread runs side by side": (
                1, lambda: raw.bench_side_by_side(n, 2),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--images", nargs="+", default=[str(REPO / "examples" / "*.png")])
    parser.add_argument("--requests", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch-files", type=int, default=16, help="files per batch request")
    parser.add_argument("--pairs", type=int, default=7, help="alternations per comparison")
    parser.add_argument("--no-workers-study", dest="workers", action="store_false")
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
              f"{settings.intra_op_threads} intra-op threads; service defaults on the CPU: "
              f"{inference_workers_for(settings.inference_workers, CPU, available_cpus())} inference "
              f"workers, max batch "
              f"{batch_size_for(settings.max_batch_size, CPU)}, max wait {settings.max_wait_ms:g} ms.", "",
              *compare(args, images, settings)]
    if args.workers:
        study = workers_study(args, images)
        report += ["", "One inference worker against the default two, single requests and batches:", "",
                   *study]
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
