"""The whole engine under another lab's camera: compression, defocus, sensor noise, tone curve, colour
cast and a coarser sensor, applied to the BCCD validation fields and the Zheng validation crops.

    .venv/bin/python benchmarks/quality_study.py [--model weights/model.onnx]   # a few minutes

The stain changes of another lab are measured by `finder_stain_study.py`; this is the rest of what
differs between microscopes and cameras. For each condition, one table row:

- BCCD validation fields (`finder_study.py`'s split): recall and precision of the result cells' boxes
  against the WBC boxes at IoU >= 0.5, and the WBC-free side strips that give a cell;
- Zheng validation crops of the model given (`training.val_names` of its metadata): Dice of the primary
  cell's nucleus, cytoplasm and cell against the expert mask (mean over crops, a crop without a primary
  cell scoring 0), and how many crops gave none.

Sizes are relative to the leukocyte, so that a 120 px crop and a 640 px field are blurred alike: blur
σ is a share of the cell's diameter (the WBC box's mean side on BCCD, 0.62 of the crop's side on the
Zheng crops, their median framing). Noise, compression and the coarser sensor act on the images as
stored, so that their strength at the network's input differs with each source's size (a 120 px crop is
enlarged to 224 px, a 300 px crop shrunk); the noise is one draw (`--seed`). The engine is the
service's on the CPU (int8 variant where one lies beside the model, no test-time augmentation), fed
lossless PNG bytes of each changed image (the JPEG rows: the pixels of the JPEG round trip).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Options, Upload
from benchmarks.bench_cells import open_engine, png_bytes
from benchmarks.cells_study import cell_corners, segment, zheng_val_names
from benchmarks.finder_study import BCCD, ZHENG, Tally, free_strip, load_bccd, read_rgb
from model_training.data import Sample, load_folders
from model_training.metrics import REGIONS, region_scores

REPO = Path(__file__).resolve().parents[1]
#: The Zheng crops show their cell over 0.57-0.68 of the side (docs/cells.md).
ZHENG_CELL_SHARE = 0.62

Change = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _jpeg(quality: int) -> Change:
    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return change


def _blur(share: float) -> Change:
    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        return cv2.GaussianBlur(rgb, (0, 0), share * cell)
    return change


def _noise(sigma: float) -> Change:
    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        return np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)
    return change


def _gamma(gamma: float) -> Change:
    table = np.clip(255 * (np.arange(256) / 255) ** gamma + 0.5, 0, 255).astype(np.uint8)

    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        return table[rgb]
    return change


def _cast(gains: tuple[float, float, float]) -> Change:
    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        return np.clip(rgb * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)
    return change


def _coarser(factor: float) -> Change:
    def change(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return change


def _identity(rgb: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
    return rgb


CONDITIONS: dict[str, Change] = {
    "as is": _identity,
    "JPEG quality 50": _jpeg(50),
    "JPEG quality 20": _jpeg(20),
    "defocus, blur σ 2 % of the cell": _blur(0.02),
    "defocus, blur σ 4 % of the cell": _blur(0.04),
    "sensor noise σ 8 grey levels": _noise(8),
    "sensor noise σ 16 grey levels": _noise(16),
    "tone curve γ 0.7 (lighter)": _gamma(0.7),
    "tone curve γ 1.4 (darker)": _gamma(1.4),
    "warm cast (R ×1.1, B ×0.9)": _cast((1.1, 1.0, 0.9)),
    "cool cast (R ×0.9, B ×1.1)": _cast((0.9, 1.0, 1.1)),
    "coarser sensor (½ resolution, upsampled)": _coarser(0.5),
}


def bccd_row(engine, change: Change, val, boxes, images, seed: int) -> tuple[float, float, int]:
    rng = np.random.default_rng(seed)
    tally, strips = Tally(), 0
    for name in val:
        truth = boxes.get(name, [])
        sides = [((x1 - x0) + (y1 - y0)) / 2 for x0, y0, x1, y1 in truth]
        cell = float(np.mean(sides)) if sides else 110.0
        image = change(images[name], cell, rng)
        # Boxes only: no masks rendered.
        result = engine.segment(Upload(name, png_bytes(image)), Options())
        tally.add([cell_corners(c) for c in result.cells], truth)
        strip = free_strip(image, truth)
        if strip is not None:
            strips += bool(engine.segment(Upload("strip.png", png_bytes(strip)), Options()).cells)
    return tally.recall, tally.precision, strips


def zheng_row(engine, change: Change, crops: list[Sample], seed: int) -> tuple[dict[str, float], int]:
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {region: [] for region in REGIONS}
    none = 0
    for crop in crops:
        image = change(crop.image, ZHENG_CELL_SHARE * min(crop.image.shape[:2]), rng)
        result, instances, labels, _ = segment(engine, f"{crop.name}.png", png_bytes(image))
        primary = result.primary_cell_id
        none += primary is None
        mine = np.zeros_like(labels) if primary is None else np.where(instances == primary, labels, 0)
        for region, value in region_scores(mine, crop.label).items():
            scores[region].append(value["dice"])
    return {k: 100 * float(np.mean(v)) for k, v in scores.items()}, none


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx",
                        help="ONNX model (the CPU serves its int8 variant when one lies beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sensor noise")
    parser.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                        help="only the conditions whose name holds one of these (say: as-is noise)")
    args = parser.parse_args()
    chosen = {label: change for label, change in CONDITIONS.items()
              if not args.only or any(text in label for text in args.only)}
    if not chosen:
        parser.error(f"no condition holds {args.only}; the conditions: {', '.join(CONDITIONS)}")
    cv2.setNumThreads(1)
    _, val, boxes = load_bccd()
    images = {name: read_rgb(BCCD / "images" / name) for name in val}
    val_names = set(zheng_val_names(model=args.model))
    crops = [c for c in load_folders([ZHENG / "dataset1", ZHENG / "dataset2"])
             if f"{c.source}/{c.name}" in val_names]
    engine = open_engine(args.model)
    truth_count = sum(len(boxes.get(n, [])) for n in val)
    print(f"{args.model}: BCCD validation {len(val)} fields, {truth_count} WBC boxes; "
          f"Zheng validation {len(crops)} crops, primary cell; noise seed {args.seed}\n")
    print(f"| condition | BCCD recall / precision | strips (of {len(val)}) with a cell "
          "| Zheng nucleus / cytoplasm / cell "
          "| crops without a cell |")
    print("| --- | --- | --- | --- | --- |")
    for label, change in chosen.items():
        recall, precision, strips = bccd_row(engine, change, val, boxes, images, args.seed)
        dices, none = zheng_row(engine, change, crops, args.seed)
        print(f"| {label} | {recall:.3f} / {precision:.3f} | {strips} | "
              f"{dices['nucleus']:.2f} / {dices['cytoplasm']:.2f} / {dices['cell']:.2f} | {none} |",
              flush=True)


if __name__ == "__main__":
    main()
