"""A figure of the service's per-cell results on BCCD validation fields (a lab neither training source
comes from; boxes only, no masks): the engine's overlay (nucleus, cytoplasm, numbered cell outlines) with
the expert leukocyte boxes drawn in yellow, for people to look at.

    .venv/bin/python benchmarks/bccd_figure.py [--model weights/model.onnx] [--count 8] \
        [--out docs/figures/bccd-overlays.jpg]

Fields: every 4th BCCD image by sorted name (the validation split of docs/cells.md), evenly spaced
through it. BCCD: MIT licence (github.com/Shenggan/BCCD_Dataset); the figure shows a few downscaled fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Engine, ModelConfig, Options, Upload
from app.engine.imaging import overlay
from benchmarks.finder_study import BCCD, load_bccd

TILE = (400, 300)  # width, height of each field in the figure
BOX = (255, 220, 0)


def field_panel(engine: Engine, name: str, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    data = (BCCD / "images" / name).read_bytes()
    result = engine.segment(Upload(name, data), Options(arrays=True))
    if not hasattr(result, "cells"):
        raise RuntimeError(f"{name}: {result}")
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    numbers = [(c.id, c.centroid) for c in result.cells]
    drawn = overlay(rgb, result.labels, result.instances, numbers)
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(drawn, (x0, y0), (x1, y1), BOX, 2)
    panel = cv2.resize(drawn, TILE, interpolation=cv2.INTER_AREA)
    caption = f"{name.removeprefix('BloodImage_').removesuffix('.jpg')}: {len(result.cells)} cell(s), " \
              f"{len(boxes)} box(es)"
    cv2.rectangle(panel, (0, 0), (TILE[0], 22), (255, 255, 255), -1)
    cv2.putText(panel, caption, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("weights/model.onnx"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/bccd-overlays.jpg"))
    args = parser.parse_args()
    cv2.setNumThreads(1)
    engine = Engine.open(ModelConfig(args.model, device="cpu", intra_op_threads=1, inference_workers=1),
                         100_000_000)
    _, val, boxes = load_bccd()
    step = max(1, len(val) // args.count)
    names = val[::step][:args.count]
    panels = [field_panel(engine, name, boxes.get(name, [])) for name in names]
    while len(panels) % args.columns:
        panels.append(np.full_like(panels[0], 255))
    rows = [np.hstack(panels[i:i + args.columns]) for i in range(0, len(panels), args.columns)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(args.out), figure, [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"{args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
