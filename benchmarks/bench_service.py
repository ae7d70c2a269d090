"""Service throughput and latency against the raw onnxruntime session, on the same images.

    .venv/bin/python benchmarks/bench_service.py                      # weights/model.onnx, examples/*.png
    .venv/bin/python benchmarks/bench_service.py --model M.onnx --images 'data/*.png' --pairs 9

Measures, in one run: raw onnxruntime sessions in this process on preprocessed inputs (the fp32 model,
and the file the service serves by default: the gated int8 variant on the CPU), the service at its
defaults per single request at concurrency 1 and 2, and the batch endpoint; then, unless
`--no-precision-study`, the service forced to fp32 against its default, and unless
`--no-batching-study`, single requests with micro-batching off and on.
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

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from app.api.settings import Settings  # noqa: E402
from app.engine.contract import ModelMetadata  # noqa: E402
from app.engine.session import (  # noqa: E402
    AUTO_BATCH_SIZE,
    CPU,
    ModelConfig,
    available_cpus,
    served_file,
    session_options,
)
from benchmarks.raw_session import RawSession  # noqa: E402
from benchmarks.service_client import (  # noqa: E402
    Measure,
    Server,
    Stats,
    bench_batch,
    bench_single,
    latency,
    median_throughput,
    paired,
    peak_rss_mib,
    ratio,
    timed,
)
from benchmarks.service_studies import batching_study, precision_study  # noqa: E402


def load_images(patterns: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file matching the patterns, sorted."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit(f"no images match {' '.join(patterns)}")
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


def compare(args: argparse.Namespace, images: list[tuple[str, bytes]], served: Path) -> list[str]:
    """The raw fp32 session and the raw session of the served file against the service at its defaults;
    Markdown lines."""
    fp32, raw = RawSession(args.model, images), RawSession(served, images)
    raw_peak = peak_rss_mib()
    costs = raw.stage_costs()
    n, files = args.requests, args.batch_files
    with Server(args.model, {"WBC_LOG_LEVEL": "WARNING"}) as server:
        server.warm(images)
        single = {c: (lambda c=c: bench_single(server.url, images, n, c)) for c in (1, 2)}

        def batch() -> Stats:
            return bench_batch(server.url, images, n, files)

        modes: dict[str, tuple[str, Measure, Measure]] = {
            "single requests, concurrency 1": ("fp32", lambda: fp32.bench(n, 1), single[1]),
            "single requests, concurrency 2": ("fp32", lambda: fp32.bench(n, 1), single[2]),
            "single requests, concurrency 1 ": (served.name, lambda: raw.bench(n, 1), single[1]),
            "single requests, concurrency 2 ": (served.name, lambda: raw.bench(n, 1), single[2]),
            f"batch endpoint, {files} files a request": (served.name, lambda: raw.bench(n, 1), batch),
            "single requests, concurrency 1, against the in-process pipeline": (
                f"{served.name}, whole pipeline", lambda: raw.bench_pipeline(n), single[1]),
        }
        measured = {label: (baseline, *paired(raw_side, service_side, args.pairs))
                    for label, (baseline, raw_side, service_side) in modes.items()}
        server_peak = peak_rss_mib(server.pid)
    lines = ["| service (defaults) | raw session of | raw img/s | service img/s | × raw "
             "| service p50 / p99 ms | raw p50 / p99 ms per run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, (baseline, raws, services) in measured.items():
        lines.append(f"| {label.strip()} | {baseline} | {median_throughput(raws):.1f} | "
                     f"{median_throughput(services):.1f} | {ratio(services, raws):.2f} | "
                     f"{latency(services)} | {latency(raws)} |")
    per_pair = "; ".join(f"{label.strip()} vs {baseline}: " + ", ".join(
                         f"{s.throughput / r.throughput:.2f}" for r, s in zip(raws, services, strict=True))
                         for label, (baseline, raws, services) in measured.items())
    image_work = sum(v for k, v in costs.items() if k != "session run")
    stages = ["| stage | CPU ms per image |", "| --- | --- |",
              *(f"| {name} | {ms:.2f} |" for name, ms in costs.items()),
              "", f"Work on the image around the session run ({served.name}): {image_work:.1f} ms of CPU per "
              f"image, {image_work / costs['session run']:.0%} of the run's {costs['session run']:.1f} ms."]
    return [*lines, "", *stages, "", f"Peak resident memory: the raw sessions' process {raw_peak:.0f} MiB "
            f"(measured before any client work); the service's process {server_peak:.0f} MiB.", "",
            f"Service / raw in each pair: {per_pair}."]


def thread_scaling(paths: Sequence[Path], size: tuple[int, int], rounds: int = 25) -> list[str]:
    """Median ms of one batch-1 run of each model on 1 and 2 intra-op threads; Markdown lines."""
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    lines = ["| model | 1 thread | 2 threads |", "| --- | --- | --- |"]
    for path in paths:
        cells = []
        for threads in (1, 2):
            session = ort.InferenceSession(str(path), session_options(threads), providers=[CPU])
            name = session.get_inputs()[0].name
            for _ in range(3):
                session.run(None, {name: x})
            times = [timed(lambda s=session, n=name: s.run(None, {n: x})) for _ in range(rounds)]
            cells.append(f"{1000 * float(np.median(times)):.1f} ms")
        lines.append(f"| `{path.name}` | {' | '.join(cells)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--images", nargs="+", default=[str(REPO / "examples" / "*.png")])
    parser.add_argument("--requests", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch-files", type=int, default=16, help="files per batch request")
    parser.add_argument("--pairs", type=int, default=7, help="alternations per comparison")
    parser.add_argument("--no-precision-study", dest="precision", action="store_false")
    parser.add_argument("--no-batching-study", dest="study", action="store_false")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    settings = Settings(model_path=args.model)
    served = served_file(ModelConfig(args.model), on_cpu=True)
    meta = ModelMetadata.for_model(served)
    report = [f"Model {meta.name} {meta.version} (`{served.name}` served by default on the CPU, fp32 "
              f"`{args.model.name}` for reference; input {meta.input.size}); "
              f"{len(images)} images ({', '.join(n for n, _ in images)}); {args.requests} images per "
              f"measurement, {args.pairs} pairs per comparison.",
              f"Machine: {platform.machine()}, {available_cpus()} CPUs available, load average "
              f"{os.getloadavg()[0]:.1f} at the start; onnxruntime {ort.__version__} on the CPU, "
              f"{settings.intra_op_threads} intra-op threads; service defaults on the CPU: max batch "
              f"{settings.max_batch_size or AUTO_BATCH_SIZE[CPU]}, max wait {settings.max_wait_ms:g} ms.", "",
              "One session run, batch 1, by intra-op threads:", "",
              *thread_scaling(sorted({args.model, served}), meta.input.size), "",
              *compare(args, images, served)]
    if args.precision:
        report += ["", "The service forced to fp32 against its default:", "", *precision_study(args, images)]
    if args.study:
        study = batching_study(args, images, settings)
        report += ["", "Micro-batching off and on, single requests:", "", *study]
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
