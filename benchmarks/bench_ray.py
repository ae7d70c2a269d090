"""`wbc-segment --engine ray` (Ray Data on a local cluster) against the in-process folder command, on the
same images on this machine, and what one image costs in each stage of the engine.

    .venv/bin/python benchmarks/bench_ray.py              # 48 BCCD fields, 3 rounds: about 15 minutes
    .venv/bin/python benchmarks/bench_ray.py --quick      # 24 fields, 1 round: about 4 minutes

Stage costs: `Engine.segment` on one thread (onnxruntime `intra_op_threads=1`, OpenCV one thread), the
thread's CPU time per image split into decode, finding the leukocytes, the model runs and the rest
(windows, stitching, measuring, encoding the PNGs); medians over the images. These are the numbers
docs/scaling.md sizes a cluster with.

Throughput: each command as its own process (`python -m app.cli IN OUT ...`), configurations in turn
round after round so that the machine's load weighs on all alike. The Ray runs start their own local
cluster (object store 200 MiB, no dashboard) and stop it; "end to end" counts that, "marginal" does not:
it is (N - n) / (T(N) - T(n)) from a run over N images and one over the first n = 4.

Images: the first N fields of the BCCD set (640 x 480 JPEG) from /work/shared/datasets/bccd, copied to a
temporary folder; generated 480 x 640 fields where the set is absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Engine, ModelConfig, Options, Upload
from app.engine.imaging import DecodeLimits, decode_image
from app.engine.locate import find_leukocytes

REPO = Path(__file__).resolve().parents[1]
BCCD = Path("/work/shared/datasets/bccd/images")
MODEL = REPO / "weights" / "model.onnx"
SMALL = 4
#: The folder command's configurations: name → extra arguments.
CONFIGS: dict[str, list[str]] = {
    "in-process": [],
    "ray, 1 actor x 1 CPU": ["--engine", "ray", "--actors", "1", "--cpus-per-actor", "1"],
    "ray, 2 actors x 0.75 CPU": ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "0.75"],
}


def images(folder: Path, count: int) -> list[Path]:
    """`count` image files in `folder`: BCCD fields, else generated fields."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(BCCD.glob("*.jpg"))[:count] if BCCD.is_dir() else []
    for source in sources:
        shutil.copy(source, folder / source.name)
    if not sources:
        from model_training.synthetic import lobes, make_field

        for seed in range(count):
            cells = [(200, 240, 45, lobes(200, 240)), (430, 200, 40, lobes(430, 200, 2))]
            rgb, _, _ = make_field(cells, seed=seed)
            path = str(folder / f"field_{seed:03d}.jpg")
            cv2.imwrite(path, rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    return sorted(folder.iterdir())


def stage_costs(files: list[Path]) -> dict[str, float]:
    """Median CPU ms per image of each stage, one thread."""
    cv2.setNumThreads(1)
    engine = Engine.open(ModelConfig(MODEL, intra_op_threads=1, inference_workers=1), DecodeLimits())
    model_ms: list[float] = []

    def infer(batch: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.thread_time()
        logits = engine.model.run(batch)  # one intra-op thread: onnxruntime runs on this thread
        model_ms.append((time.thread_time() - started) * 1000.0)
        return logits, model_ms[-1]

    options = Options(mask_png=True, instances_png=True)
    rows: dict[str, list[float]] = {k: [] for k in ("decode", "find", "model", "rest", "total", "cells")}
    for path in files:
        data = path.read_bytes()
        started = time.thread_time()
        image = np.asarray(decode_image(data, DecodeLimits()))
        decoded = time.thread_time()
        found = find_leukocytes(image)
        located = time.thread_time()
        model_ms.clear()
        engine.segment(Upload(path.name, data), options, infer)  # decodes and finds again, then the rest
        total = (time.thread_time() - located) * 1000.0
        decode, find = (decoded - started) * 1000.0, (located - decoded) * 1000.0
        for key, value in (("decode", decode), ("find", find), ("model", sum(model_ms)), ("total", total),
                           ("rest", total - decode - find - sum(model_ms)), ("cells", len(found))):
            rows[key].append(float(value))
    return {key: statistics.median(values) for key, values in rows.items()}


def run(folder: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of one `wbc-segment` process over `folder`."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "app.cli", str(folder), str(out), "--model", str(MODEL), "--no-progress",
               *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def throughput(files: list[Path], rounds: int, work: Path) -> dict[str, dict[str, float]]:
    """Per configuration: median seconds over N images and over the first `SMALL`, and img/s."""
    small = work / "small"
    small.mkdir()
    for path in files[:SMALL]:
        shutil.copy(path, small / path.name)
    times: dict[str, dict[str, list[float]]] = {name: {"all": [], "small": []} for name in CONFIGS}
    for round_ in range(rounds):
        for name, extra in CONFIGS.items():
            times[name]["all"].append(run(files[0].parent, work / "out", extra))
            times[name]["small"].append(run(small, work / "out", extra))
            print(f"  round {round_ + 1}: {name}: {times[name]['all'][-1]:.1f} s, "
                  f"{times[name]['small'][-1]:.1f} s for {SMALL}", flush=True)
    report = {}
    for name, measured in times.items():
        big, little = statistics.median(measured["all"]), statistics.median(measured["small"])
        report[name] = {"seconds": big, "small_seconds": little, "end_to_end": len(files) / big,
                        "marginal": (len(files) - SMALL) / max(big - little, 1e-9)}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="24 images, 1 round")
    args = parser.parse_args(argv)
    count, rounds = (24, 1) if args.quick else (args.images, args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        files = images(work / "in", count)
        print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.1f}, {len(files)} images ({files[0].suffix}), {MODEL.name}", flush=True)
        costs = stage_costs(files)
        print("\nCPU ms per image, one thread (median):")
        print("| decode | find | model | rest | total | cells found |\n| --- | --- | --- | --- | --- | --- |")
        print(f"| {costs['decode']:.1f} | {costs['find']:.1f} | {costs['model']:.1f} | {costs['rest']:.1f} "
              f"| {costs['total']:.1f} | {costs['cells']:.0f} |\n")
        report = throughput(files, rounds, work)
    base = report["in-process"]
    print(f"\n{len(files)} images, median of {rounds} round(s), load {os.getloadavg()[0]:.1f} at the end:")
    print("| configuration | seconds | img/s end to end | × in-process | img/s marginal | × in-process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in report.items():
        ratio, marginal_ratio = r["end_to_end"] / base["end_to_end"], r["marginal"] / base["marginal"]
        print(f"| {name} | {r['seconds']:.1f} | {r['end_to_end']:.2f} | {ratio:.2f} "
              f"| {r['marginal']:.2f} | {marginal_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
