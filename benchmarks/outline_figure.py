"""A figure of the primary cell's outlines against the expert's on Zheng validation crops: the expert's
cell and nucleus outlines in green, the service's in magenta, each crop with its cell Dice and its cell
surface Dice at 2 px (`wbc-evaluate`'s), for people to see what a point of Dice is made of.

    .venv/bin/python benchmarks/outline_figure.py [--model weights/model.onnx] \
        [--crops dataset2/004 dataset2/025 dataset2/045 dataset2/100] \
        [--out docs/figures/dataset2-outlines.jpg]

Zheng et al. 2018 (GPL-3.0, `../shared/datasets/wbc-zheng2018`); the figure shows a few validation crops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.finder_study import ZHENG
from model_training.data import load_folders
from model_training.evaluate import load_model, predict_primary_cell
from model_training.metrics import REGIONS, region_scores

EXPERT, SERVICE = (0, 200, 0), (230, 0, 230)
TILE = 400


def outlined(rgb: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int], scale: float) -> None:
    """Draw the cell and nucleus outlines of `labels` on `rgb` (already `scale` times larger)."""
    for classes in (REGIONS["cell"], REGIONS["nucleus"]):
        mask = np.isin(labels, classes).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        scaled = [np.round((c.astype(np.float32) + 0.5) * scale - 0.5).astype(np.int32) for c in contours]
        cv2.drawContours(rgb, scaled, -1, colour, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="weights/model.onnx")
    parser.add_argument("--crops", nargs="+",
                        default=["dataset2/004", "dataset2/025", "dataset2/045", "dataset2/100"])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/dataset2-outlines.jpg"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    model = load_model(args.model, device)
    wanted = {tuple(c.split("/", 1)) for c in args.crops}
    samples = {(s.source, s.name): s for s in load_folders(sorted({ZHENG / src for src, _ in wanted}))}
    tiles = []
    for key in [tuple(c.split("/", 1)) for c in args.crops]:
        sample = samples[key]
        pred = predict_primary_cell(model.module, sample.image, model.transform, device, "none")
        scores = region_scores(pred, sample.label, surface=True)["cell"]
        scale = TILE / max(sample.image.shape[:2])
        tile = cv2.resize(sample.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        outlined(tile, sample.label, EXPERT, scale)
        outlined(tile, pred, SERVICE, scale)
        dice, surface = 100 * scores["dice"], 100 * scores["surface_dice_2px"]
        text = f"{'/'.join(key)}  Dice {dice:.1f}  surface 2px {surface:.1f}"
        cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
        print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
