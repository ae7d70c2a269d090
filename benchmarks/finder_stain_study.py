"""The finder on BCCD's validation fields under changed stains and exposure, with and without its
small-and-pale rule (docs/cells.md): recall and precision of the WBC boxes, and the WBC-free side
strips that give a candidate; and the whole engine (finder, shipped model, stitching) on the same
images: recall and precision of its cells' boxes.

    .venv/bin/python benchmarks/finder_stain_study.py     # about 1 minute; reads ../shared/datasets/bccd

Stain changes are made in optical-density space with the training's HED jitter
(`model_training.transforms.hed_jitter`): haematoxylin (nuclei) and eosin (red cells) amounts scaled;
exposure by scaling the pixel values. Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Options, Upload
from app.engine.locate import Params, detect
from benchmarks.bench_cells import open_engine, png_bytes
from benchmarks.cells_study import cell_corners
from benchmarks.finder_study import BCCD, Tally, corners, free_strip, load_bccd, read_rgb
from model_training.transforms import hed_jitter, to_tensor

#: name → HED gains (haematoxylin, eosin, DAB), or a factor on the pixel values.
CONDITIONS: dict[str, tuple[float, float, float] | float | None] = {
    "as is": None, "haematoxylin x0.6": (0.6, 1, 1), "haematoxylin x0.8": (0.8, 1, 1),
    "haematoxylin x1.3": (1.3, 1, 1), "haematoxylin and eosin x0.7": (0.7, 0.7, 1), "eosin x1.4": (1, 1.4, 1),
    "brighter x1.15": 1.15, "darker x0.8": 0.8,
}
RULES = {"no rule": Params(pale_size=0.0), "absolute level only": Params(pale_ratio=100.0),
         "shipped": Params()}


def restained(image: np.ndarray, change: tuple[float, float, float] | float | None) -> np.ndarray:
    if change is None:
        return image
    if isinstance(change, float):
        return np.clip(image.astype(np.float32) * change, 0, 255).astype(np.uint8)
    x = hed_jitter(to_tensor(image), change, (0.0, 0.0, 0.0))
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def main() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _, val, boxes = load_bccd()
    images = {name: read_rgb(BCCD / "images" / name) for name in val}
    print(f"BCCD validation: {len(val)} fields, {sum(len(boxes.get(n, [])) for n in val)} WBC boxes; "
          "finder alone; recall / precision at IoU >= 0.5 and WBC-free strips with a candidate\n")
    engine = open_engine(Path(__file__).resolve().parents[1] / "weights" / "model.onnx")
    print("| stain or exposure | " + " | ".join(f"finder, {r}" for r in RULES) + " | whole engine |")
    print("| --- |" + " --- |" * (len(RULES) + 1))
    for label, change in CONDITIONS.items():
        cells = []
        for params in RULES.values():
            tally, strips = Tally(), 0
            for name in val:
                image = restained(images[name], change)
                tally.add([corners(c) for c in detect(image, None, params)], boxes.get(name, []))
                strip = free_strip(image, boxes.get(name, []))
                strips += strip is not None and bool(detect(strip, None, params))
            cells.append(f"{tally}, {strips}")
        tally = Tally()
        for name in val:
            result = engine.segment(Upload(name, png_bytes(restained(images[name], change))), Options())
            tally.add([cell_corners(c) for c in result.cells], boxes.get(name, []))
        cells.append(str(tally))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
