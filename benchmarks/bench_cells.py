"""Whole-engine speed and memory per image: `Engine.segment` from file bytes to a `Result` with the
instance and class masks encoded, on the CPU, single-threaded (OpenCV, onnxruntime
`intra_op_threads=1`, one inference worker; the int8 model is served on the CPU).

    .venv/bin/python benchmarks/bench_cells.py            # 5 rounds: about 3 minutes (loaded 2-core machine)
    .venv/bin/python benchmarks/bench_cells.py --quick    # 2 rounds: about 1.5 minutes

Every case runs once per round, round after round, so that a busy machine slows all of them alike;
the report gives medians over the rounds and each case as a ratio to the crop's median. On a shared
machine the wall clock counts the time the process waited for a core; its CPU time
(`time.process_time`) does not, so ratios and shares are given on CPU time (wall beside it).

Test images (from `/work/shared/datasets`, built in memory, never written into the project):

- crop: `examples/cellavision_050.png` (300 x 300, one lymphocyte);
- BCCD field: `BloodImage_00005.jpg` (640 x 480, one leukocyte), its own JPEG bytes;
- canvases: a background tiled from 200 x 200 blocks cut from the WBC-free side strips of BCCD
  fields (blocks in which the finder sees nothing), with one-leukocyte patches (288 x 288 around a
  single WBC box of a BCCD field) pasted into 320 x 320 slots; encoded as JPEG (quality 95) like the
  BCCD fields. The "1226 x 652, one cell" case is such a canvas, not a generated field.
- pixels: the same 4 patches on canvases of 1, 4 and 16 MP ("padded": cells at native size, more
  background), and the BCCD field upscaled (INTER_LINEAR) to 1, 4 and 16 MP ("upscaled": the same
  content at a higher magnification, cells grow with the image);
- cells: 1, 4, 16, 64 patches on one 2560 x 2560 canvas.

The finder's share: `app.engine.locate.find_leukocytes` alone on the decoded pixels of the same image.
Peak memory: each case in a fresh subprocess (engine opened and warmed on the crop first, file bytes
read), VmHWM of /proc/self/status before and after `Engine.segment`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
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
from app.engine.augment import Setting
from app.engine.locate import find_leukocytes
from benchmarks.finder_study import BCCD, _largest_free_rectangle, load_bccd, read_rgb

cv2.setNumThreads(1)
REPO = Path(__file__).resolve().parents[1]
CROP = REPO / "examples" / "cellavision_050.png"
FIELD = "BloodImage_00005.jpg"
BLOCK, PATCH, SLOT = 200, 288, 320
OPTIONS = Options(instances_png=True, mask_png=True)


def open_engine(model: Path, tta: Setting = "none", threads: int = 1) -> Engine:
    """The engine on the CPU, `threads` threads, one inference worker, test-time augmentation `tta`."""
    # 100_000_000: the largest pixel count (positional: the signature is changing)
    return Engine.open(ModelConfig(model, device="cpu", intra_op_threads=threads, inference_workers=1,
                                   tta=tta), 100_000_000)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB image as lossless PNG bytes (what an upload of a generated image would be)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def jpeg(rgb: np.ndarray) -> bytes:
    """RGB → JPEG bytes, quality 95."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def decode(data: bytes) -> np.ndarray:
    """File bytes → RGB pixels (as the engine sees them, near enough for timing the finder)."""
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class Material:
    """Background blocks and one-leukocyte patches cut from BCCD fields."""

    def __init__(self) -> None:
        train, val, boxes = load_bccd()
        self.blocks: list[np.ndarray] = []
        self.patches: list[np.ndarray] = []
        for name in train + val:
            rgb = read_rgb(BCCD / "images" / name)
            h, w = rgb.shape[:2]
            wbc = boxes.get(name, [])
            free = np.ones((h, w), bool)
            for x0, y0, x1, y1 in wbc:
                free[max(0, y0 - 10):y1 + 10, max(0, x0 - 10):x1 + 10] = False
            region = _largest_free_rectangle(free)
            if region is not None:
                x0, y0, x1, y1 = region
                for y in range(y0, y1 - BLOCK + 1, BLOCK):
                    for x in range(x0, x1 - BLOCK + 1, BLOCK):
                        block = np.ascontiguousarray(rgb[y:y + BLOCK, x:x + BLOCK])
                        if not find_leukocytes(block):
                            self.blocks.append(block)
            if len(wbc) == 1:
                x0, y0, x1, y1 = wbc[0]
                cx = int(np.clip((x0 + x1) // 2 - PATCH // 2, 0, w - PATCH))
                cy = int(np.clip((y0 + y1) // 2 - PATCH // 2, 0, h - PATCH))
                self.patches.append(np.ascontiguousarray(rgb[cy:cy + PATCH, cx:cx + PATCH]))

    def canvas(self, width: int, height: int, cells: int, seed: int = 0) -> np.ndarray:
        """A width x height field: background blocks, `cells` patches in distinct 320 x 320 slots."""
        rng = np.random.default_rng(seed)
        out = np.empty((height, width, 3), np.uint8)
        for y in range(0, height, BLOCK):
            for x in range(0, width, BLOCK):
                block = self.blocks[int(rng.integers(len(self.blocks)))]
                out[y:y + BLOCK, x:x + BLOCK] = block[:height - y, :width - x]
        slots = [(sx, sy) for sy in range(height // SLOT) for sx in range(width // SLOT)]
        if cells > len(slots):
            raise ValueError(f"{cells} cells do not fit {width}x{height}")
        chosen = rng.choice(len(slots), size=cells, replace=False) if cells else []
        ox, oy = (width - SLOT * (width // SLOT)) // 2, (height - SLOT * (height // SLOT)) // 2
        for k, index in enumerate(sorted(chosen)):
            sx, sy = slots[index]
            x, y = ox + sx * SLOT + (SLOT - PATCH) // 2, oy + sy * SLOT + (SLOT - PATCH) // 2
            out[y:y + PATCH, x:x + PATCH] = self.patches[(k + seed) % len(self.patches)]
        return out


def side_for(megapixels: float, aspect: float = 4 / 3) -> tuple[int, int]:
    """(width, height) of about `megapixels` at `aspect`."""
    height = round(np.sqrt(megapixels * 1e6 / aspect))
    return round(height * aspect), height


def build_cases(material: Material) -> dict[str, tuple[str, bytes, int | None]]:
    """name → (description, file bytes, cells placed or None)."""
    field_rgb = read_rgb(BCCD / "images" / FIELD)
    cases: dict[str, tuple[str, bytes, int | None]] = {
        "crop": ("300x300 Zheng crop (cellavision_050.png)", CROP.read_bytes(), 1),
        "field": ("640x480 BCCD field 00005 (JPEG)", (BCCD / "images" / FIELD).read_bytes(), 1),
        "wide1": ("1226x652 canvas, 1 cell", jpeg(material.canvas(1226, 652, 1, seed=1)), 1),
        "big40": ("4000x3000 canvas, 40 cells", jpeg(material.canvas(4000, 3000, 40, seed=2)), 40),
    }
    for mp in (1, 4, 16):
        w, h = side_for(mp)
        cases[f"pad{mp}"] = (f"{w}x{h} ({mp} MP) canvas, 4 cells (padded)",
                             jpeg(material.canvas(w, h, 4, seed=3)), 4)
        up = cv2.resize(field_rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        cases[f"up{mp}"] = (f"{w}x{h} ({mp} MP) field 00005 upscaled x{w / 640:.1f}", jpeg(up), 1)
    for n in (1, 4, 16, 64):
        cases[f"cells{n}"] = (f"2560x2560 canvas, {n} cells", jpeg(material.canvas(2560, 2560, n, seed=4)), n)
    return cases


def time_cases(engine: Engine, cases, repeats: int) -> dict[str, dict]:
    """Round after round, every case once: Engine.segment seconds (wall and this process's CPU), model
    seconds, model runs and windows (batch items), decode seconds (PIL, as the engine decodes), finder
    seconds (wall and CPU), cells found."""
    keys = ("total", "cpu", "model", "decode", "finder", "finder_cpu")
    stats = {name: {**{k: [] for k in keys}, "cells": None, "runs": 0, "windows": 0} for name in cases}
    pixels = {name: decode(data) for name, (_, data, _) in cases.items()}
    calls: list[int] = []

    def counting(images: np.ndarray) -> tuple[np.ndarray, float]:
        calls.append(len(images))
        return engine.infer(images)

    for name, (_, data, _) in cases.items():  # warm-up: first runs pay for allocations
        engine.segment(Upload(name, data), OPTIONS)
    for _ in range(repeats):
        for name, (_, data, _) in cases.items():
            calls.clear()
            started, cpu = time.perf_counter(), time.process_time()
            result = engine.segment(Upload(name, data), OPTIONS, counting)
            stats[name]["total"].append(time.perf_counter() - started)
            stats[name]["cpu"].append(time.process_time() - cpu)
            stats[name]["model"].append(result.inference_ms / 1000)
            stats[name].update(cells=len(result.cells), runs=len(calls), windows=sum(calls))
            started = time.perf_counter()
            decode(data)
            stats[name]["decode"].append(time.perf_counter() - started)
            started, cpu = time.perf_counter(), time.process_time()
            find_leukocytes(pixels[name])
            stats[name]["finder"].append(time.perf_counter() - started)
            stats[name]["finder_cpu"].append(time.process_time() - cpu)
    return {name: {k: statistics.median(v) if isinstance(v, list) else v for k, v in s.items()}
            for name, s in stats.items()}


def vm_hwm_mib() -> float:
    """This process's peak resident memory so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(model: Path, path: Path, stages: bool) -> None:
    """In a fresh process: open and warm the engine, read the file, then segment it; print JSON. With
    `stages`, the engine's steps are run one by one instead (as `Engine.segment` runs them) and the
    peak after each is given, to show which step raises it."""
    from app.engine.cells import measure_cells, segment_cells
    from app.engine.imaging import decode_image, encode_instances_png, encode_mask_png
    from app.engine.measure import measure

    engine = open_engine(model)
    engine.segment(Upload("crop.png", CROP.read_bytes()), OPTIONS)
    data = path.read_bytes()
    before = vm_hwm_mib()
    started = time.perf_counter()
    peaks = {}
    if stages:
        image = decode_image(data, 100_000_000)  # kept, as `Engine` keeps it while it works
        pixels = np.asarray(image)
        peaks["decode"] = vm_hwm_mib()
        stitched, _ = segment_cells(pixels, engine.transform, engine.infer)
        peaks["find + windows + model + stitch"] = vm_hwm_mib()
        cells = measure_cells(stitched, None)
        peaks["per-cell measures"] = vm_hwm_mib()
        measure(stitched.labels, None)
        peaks["image measures (class areas)"] = vm_hwm_mib()
        encode_mask_png(stitched.labels)
        encode_instances_png(stitched.instances)
        peaks["mask + instances PNG"] = vm_hwm_mib()
        found = len(cells)
        del image
    else:
        found = len(engine.segment(Upload(path.name, data), OPTIONS).cells)
    seconds = time.perf_counter() - started
    print(json.dumps({"before": before, "after": vm_hwm_mib(), "cells": found, "seconds": seconds,
                      "file_mib": len(data) / 2**20, "stages": peaks}))


def memory_cases(model: Path, material: Material) -> list[tuple[str, dict]]:
    """Peak RSS growth of the crop, the 4000x3000 and a 40 MP (7300x5480) canvas, each in a fresh process;
    then the 40 MP canvas again, step by step."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        images = [("300x300 crop", CROP, 1, False)]
        for label, (w, h, n, seed) in (("4000x3000, 40 cells", (4000, 3000, 40, 2)),
                                       ("7300x5480 (40 MP), 100 cells", (7300, 5480, 100, 5))):
            path = Path(folder) / f"{w}x{h}.jpg"
            path.write_bytes(jpeg(material.canvas(w, h, n, seed=seed)))
            images.append((label, path, n, False))
        images.append(("7300x5480 (40 MP), step by step", images[-1][1], images[-1][2], True))
        for label, path, placed, stages in images:
            command = [sys.executable, __file__, "--model", str(model), "--memory-child", str(path)]
            command += ["--stages"] if stages else []
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["placed"] = placed
            rows.append((label, row))
    return rows


def main() -> None:
    """Print the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory cases")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.model, args.memory_child, args.stages)
        return
    repeats = 2 if args.quick else args.repeats
    started = time.perf_counter()
    material = Material()
    cases = build_cases(material)
    engine = open_engine(args.model)
    stats = time_cases(engine, cases, repeats)
    load = os.getloadavg()
    crop_cpu = stats["crop"]["cpu"]
    print(f"# Whole-engine speed and memory\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, model "
          f"`{engine.model.path.name}`, CPU, 1 thread; {repeats} rounds, medians; load average at the end "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs. Material: "
          f"{len(material.blocks)} background blocks, {len(material.patches)} one-cell patches. CPU ms is "
          f"this process's CPU time (less disturbed by other jobs than the wall clock); ratios use it.\n")
    print("| case | cells placed / found | wall ms | CPU ms | × crop (CPU) | model runs / windows | model ms "
          "| decode ms | finder ms | finder share (wall / CPU) "
          "| rest ms (windows, stitch, measure, encode) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (label, _, placed) in cases.items():
        s = stats[name]
        rest = s["total"] - s["model"] - s["finder"] - s["decode"]
        print(f"| {label} | {placed} / {s['cells']} | {1000 * s['total']:.0f} | {1000 * s['cpu']:.0f} "
              f"| {s['cpu'] / crop_cpu:.1f} | {s['runs']} / {s['windows']} | {1000 * s['model']:.0f} "
              f"| {1000 * s['decode']:.0f} | {1000 * s['finder']:.1f} "
              f"| {100 * s['finder'] / s['total']:.0f} % / "
              f"{100 * s['finder_cpu'] / s['cpu']:.0f} % "
              f"| {1000 * rest:.0f} |")

    def growth(keys: list[str], unit: str) -> str:
        cpu, wall = stats[keys[0]]["cpu"], stats[keys[0]]["total"]
        return ", ".join(f"{k.removeprefix(unit)}: {stats[k]['cpu'] / cpu:.1f}× "
                         f"({stats[k]['total'] / wall:.1f}× wall)" for k in keys)

    print(f"\n- pixels, padded (4 cells at native size; 1/4/16 MP), CPU time relative to 1 MP: "
          f"{growth(['pad1', 'pad4', 'pad16'], 'pad')}")
    print(f"- pixels, upscaled (field 00005 at 1/4/16 MP): {growth(['up1', 'up4', 'up16'], 'up')}")
    print(f"- cells (2560x2560 canvas, 1/4/16/64 cells), relative to 1 cell: "
          f"{growth(['cells1', 'cells4', 'cells16', 'cells64'], 'cells')}")
    wide = stats["wide1"]
    print(f"- finder share of the 1226x652 one-cell field: {100 * wide['finder'] / wide['total']:.0f} % "
          f"of the wall time ({1000 * wide['finder']:.1f} of {1000 * wide['total']:.0f} ms), "
          f"{100 * wide['finder_cpu'] / wide['cpu']:.0f} % of its CPU time "
          f"({1000 * wide['finder_cpu']:.1f} of "
          f"{1000 * wide['cpu']:.0f} ms)")
    if not args.no_memory:
        print("\n| image (fresh process each) | file MiB | cells placed / found | VmHWM before MiB "
              "| after MiB | growth MiB | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        steps = []
        for label, row in memory_cases(args.model, material):
            print(f"| {label} | {row['file_mib']:.1f} | {row['placed']} / {row['cells']} "
                  f"| {row['before']:.0f} "
                  f"| {row['after']:.0f} | {row['after'] - row['before']:.0f} | {row['seconds']:.2f} |")
            last = row["before"]
            for step, peak in row["stages"].items():
                steps.append(f"{step} +{peak - last:.0f}")
                last = peak
        print(f"\nPeak growth by step, 40 MP (MiB): {', '.join(steps)}.")
    print(f"\nWhole run: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
