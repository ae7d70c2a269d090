"""Whole-engine study: every leukocyte of an image through `Engine.segment` (finder, windows at the
model's scale, stitching), on BCCD fields and on mosaics of Zheng validation crops.

Run: ``.venv/bin/python benchmarks/cells_study.py [--crops /tmp/cells_fp] [--scale-fields 8]``;
prints a Markdown report. Single-threaded (OpenCV and onnxruntime), CPU model (the int8 variant is
served automatically on the CPU).

- BCCD (`/work/shared/datasets/bccd/`): the split and the greedy IoU matching of
  `benchmarks/finder_study.py` (sorted names, index % 4 == 3 is validation; true positive at
  IoU >= 0.5). Boxes are the result cells' boxes (the box of each instance region), not the finder's.
  Validation errors are saved as crops for review (result cell outline in white, its box red, the WBC
  box green).
- Zheng mosaics: the 64 validation crops of the shipped model (`training.val_names` of
  `weights/model.json`), sorted, in four 4x4 mosaics of 128x128 tiles (masks resized nearest). A crop
  is found when a result cell's box has IoU >= 0.5 with the box of the crop's cell mask (> 64); Dice of
  a matched cell: its instance region vs the crop's cell mask, over the whole mosaic.
- Scale: validation fields at 0.5x, 1x, 2x; cells matched to the 1x cells by centroid.
- No leukocyte: the largest WBC-free side strip (>= 200x200, 10 px clear of every WBC box) of each
  validation field must give no cell.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import Engine, Options, Upload
from app.engine.augment import MODES
from app.engine.contract import metadata_path
from app.engine.locate import _analyse, find_leukocytes
from benchmarks.bench_cells import open_engine, png_bytes
from benchmarks.finder_study import (
    BCCD,
    ZHENG,
    Tally,
    corners,
    free_strip,
    iou,
    load_bccd,
    match,
    read_rgb,
)

cv2.setNumThreads(1)
REPO = Path(__file__).resolve().parents[1]
TILE = 128
SCALES = (0.5, 1.0, 2.0)
AREA_TOLERANCE = 0.10


def segment(engine: Engine, name: str, data: bytes):
    """`Engine.segment` with the instance and class masks decoded: (result, instances, labels, seconds)."""
    started = time.perf_counter()
    result = engine.segment(Upload(name, data), Options(instances_png=True, mask_png=True))
    elapsed = time.perf_counter() - started
    if not hasattr(result, "cells"):
        raise RuntimeError(f"{name}: {result}")
    instances = np.array(Image.open(io.BytesIO(result.instances_png)))
    labels = np.array(Image.open(io.BytesIO(result.mask_png)))
    return result, instances, labels, elapsed


def cell_corners(cell) -> tuple[int, int, int, int]:
    """A result cell's (x, y, w, h) box as (x0, y0, x1, y1)."""
    x, y, w, h = cell.bbox
    return (x, y, x + w, y + h)


# --- a. BCCD -------------------------------------------------------------------------------------------


def bccd_split(engine: Engine, names, boxes, runs: dict, errors: list | None) -> dict:
    """Recall/precision of the result cells' boxes and of the finder's boxes on some BCCD fields."""
    cells, finder = Tally(), Tally()
    seconds, listed, tp_ious = [], [], []
    for name in names:
        data = (BCCD / "images" / name).read_bytes()
        result, instances, _, elapsed = segment(engine, name, data)
        runs[name] = (result, instances)
        seconds.append(elapsed)
        found = [cell_corners(c) for c in result.cells]
        truth = boxes.get(name, [])
        matched, extra, missed = cells.add(found, truth)
        tp_ious.extend(value for _, _, value in matched)
        for i in extra:
            best = max((iou(found[i], t) for t in truth), default=0.0)
            listed.append((name, "FP", found[i], best, result.cells[i]))
        for j in missed:
            best = max((iou(f, truth[j]) for f in found), default=0.0)
            listed.append((name, "FN", truth[j], best, None))
        finder.add([corners(c) for c in find_leukocytes(read_rgb(BCCD / "images" / name))], truth)
    if errors is not None:
        errors.extend(listed)
    return {
        **cells.summary(), "errors": listed, "iou_median": float(np.median(tp_ious)),
        "iou_low": int(sum(v < 0.7 for v in tp_ious)),
        "f_recall": finder.recall, "f_precision": finder.precision,
        "ms": 1000 * float(np.median(seconds)), "ms_max": 1000 * float(np.max(seconds)),
    }


def save_review(errors, runs, folder: Path) -> list[str]:
    """Crops of each validation error with the result cells' outlines (white), the result box (red)
    and the WBC box (green), with 60 px of context; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for index, (name, kind, (x0, y0, x1, y1), _, _) in enumerate(errors):
        rgb = read_rgb(BCCD / "images" / name)
        _, instances = runs[name]
        for cell_id in np.unique(instances)[1:]:
            contours, _ = cv2.findContours((instances == cell_id).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, contours, -1, (255, 255, 255), 1)
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), (0, 200, 0) if kind == "FN" else (255, 0, 0), 2)
        h, w = rgb.shape[:2]
        crop = rgb[max(0, y0 - 60):min(h, y1 + 60), max(0, x0 - 60):min(w, x1 + 60)]
        path = folder / f"{index:03d}_{kind}_{name[:-4]}.png"
        cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        saved.append(path.name)
    return saved


# --- b. Zheng mosaics ----------------------------------------------------------------------------------


def zheng_val_names(order: str = "sorted", model: Path = REPO / "weights" / "model.onnx") -> list[str]:
    """A model's validation crops ("dataset1/046", ...; by default the shipped model's): sorted (one
    source per mosaic), or as listed in its metadata (shuffled: sources mixed within a mosaic)."""
    meta = json.loads(metadata_path(model).read_text())
    names = list(meta["training"]["val_names"])
    return sorted(names) if order == "sorted" else names


def zheng_tile(entry: str, balance: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One crop and its 0/128/255 mask, both TILE x TILE (area / nearest); with `balance`, each channel
    scaled so that the crop's 99th percentile (its background) becomes 245, as if all crops had been
    taken with one white balance."""
    dataset, stem = entry.split("/")
    rgb = cv2.resize(read_rgb(ZHENG / dataset / "images" / f"{stem}.bmp"), (TILE, TILE),
                     interpolation=cv2.INTER_AREA)
    if balance:
        white = np.percentile(rgb.reshape(-1, 3), 99, axis=0).clip(1, None)
        rgb = np.clip(rgb * (245.0 / white), 0, 255).astype(np.uint8)
    mask = cv2.imread(str(ZHENG / dataset / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    return rgb, cv2.resize(mask, (TILE, TILE), interpolation=cv2.INTER_NEAREST)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def mosaic(entries: list[str], balance: bool = False):
    """A 4x4 mosaic of 16 crops: (image, its mask, the tiles, their masks, each crop's cell box (x0, y0,
    x1, y1) in the mosaic)."""
    tiles, masks = zip(*(zheng_tile(e, balance) for e in entries), strict=True)
    image = np.vstack([np.hstack(tiles[r * 4:(r + 1) * 4]) for r in range(4)])
    truth_mask = np.vstack([np.hstack(masks[r * 4:(r + 1) * 4]) for r in range(4)])
    truth = []
    for k in range(16):
        ys, xs = np.nonzero(masks[k] > 64)
        ox, oy = TILE * (k % 4), TILE * (k // 4)
        truth.append((xs.min() + ox, ys.min() + oy, xs.max() + 1 + ox, ys.max() + 1 + oy))
    return image, truth_mask, tiles, masks, truth


def mosaic_check(engine: Engine, entries: list[str], balance: bool = False) -> dict:
    """One 4x4 mosaic of 16 crops: crops found, extra cells, cell and nucleus Dice of matched cells;
    and, for reference, the same tiles each segmented alone (128x128)."""
    image, truth_mask, tiles, masks, truth = mosaic(entries, balance)
    result, instances, labels, _ = segment(engine, "mosaic.png", png_bytes(image))
    found = [cell_corners(c) for c in result.cells]
    matched, extra, missed = match(found, truth)
    cell_dice, nucleus_dice, alone_dice, per_tile = [], [], [], {}
    for i, k, _ in matched:
        ox, oy = TILE * (k % 4), TILE * (k // 4)
        inside = np.zeros(truth_mask.shape, bool)
        inside[oy:oy + TILE, ox:ox + TILE] = True
        mine = instances == result.cells[i].id
        true_cell = (truth_mask > 64) & inside
        cell_dice.append(dice(mine, true_cell))
        nucleus_dice.append(dice(mine & (labels == 2), (truth_mask > 192) & inside))
        per_tile[k] = cell_dice[-1]
    for k in range(16):
        alone, alone_instances, _, _ = segment(engine, "tile.png", png_bytes(tiles[k]))
        if alone.primary_cell_id:
            alone_dice.append(dice(alone_instances == alone.primary_cell_id, masks[k] > 64))
        else:
            alone_dice.append(0.0)
    # Why a crop was missed: nucleus pixels the finder's global threshold kept in its tile (working
    # copy of the mosaic), and how many candidates the finder gives on the tile alone.
    scale = min(1.0, 320 / image.shape[0])
    _, nucleus, _ = _analyse(image, scale, None)
    side = nucleus.shape[0] / 4
    why = []
    for j in missed:
        r0, c0 = round(side * (j // 4)), round(side * (j % 4))
        kept = int(nucleus[r0:round(r0 + side), c0:round(c0 + side)].sum())
        why.append(f"{entries[j]} (nucleus px kept {kept}, finder alone {len(find_leukocytes(tiles[j]))})")
    return {"found": len(matched), "cells": len(found), "extra": len(extra), "missed": why,
            "extra_iou": [round(max((iou(found[i], t) for t in truth), default=0.0), 2) for i in extra],
            "cell_dice": cell_dice, "nucleus_dice": nucleus_dice, "alone_dice": alone_dice,
            "low": sorted(((d, entries[k]) for k, d in per_tile.items()))[:3]}


# --- c. scale ------------------------------------------------------------------------------------------


def scale_check(engine: Engine, name: str) -> dict:
    """Cell counts at each scale, and per-cell area / scale^2 relative to the 1x area (cells matched by
    centroid: nearest within the 1x cell's equivalent radius)."""
    rgb = read_rgb(BCCD / "images" / name)
    cells = {}
    for factor in SCALES:
        resized = rgb if factor == 1.0 else cv2.resize(
            rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        result, _, _, _ = segment(engine, "scaled.png", png_bytes(resized))
        cells[factor] = result.cells
    ratios: dict[float, list[float | None]] = {}
    for factor in SCALES:
        if factor == 1.0:
            continue
        row = []
        for base in cells[1.0]:
            radius = np.sqrt(base.areas_px["cell"] / np.pi)
            options = [(np.hypot(c.centroid[0] / factor - base.centroid[0],
                                 c.centroid[1] / factor - base.centroid[1]), c) for c in cells[factor]]
            options = [o for o in options if o[0] <= radius]
            if not options:
                row.append(None)
                continue
            cell = min(options, key=lambda o: o[0])[1]
            row.append(cell.areas_px["cell"] / factor**2 / base.areas_px["cell"])
        ratios[factor] = row
    return {"counts": {f: len(c) for f, c in cells.items()}, "ratios": ratios,
            "areas_1x": [c.areas_px["cell"] for c in cells[1.0]]}


# --- d. no leukocyte -----------------------------------------------------------------------------------


def empty_check(engine: Engine, names, boxes, folder: Path) -> tuple[int, int, list]:
    """Cells found in the largest WBC-free strip of each field: (strips with a cell, strips, details)."""
    bad, total, details = 0, 0, []
    for name in names:
        strip = free_strip(read_rgb(BCCD / "images" / name), boxes.get(name, []))
        if strip is None:
            continue
        result, _, _, _ = segment(engine, "strip.png", png_bytes(strip))
        total += 1
        if result.cells:
            bad += 1
            details.append((name, strip.shape[1::-1], [(c.bbox, c.areas_px["cell"], c.score)
                                                        for c in result.cells]))
            shown = strip.copy()
            for c in result.cells:
                x, y, cw, ch = c.bbox
                cv2.rectangle(shown, (x, y), (x + cw - 1, y + ch - 1), (255, 0, 0), 2)
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"strip_{name[:-4]}.png"), cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
    return bad, total, details


# --- report --------------------------------------------------------------------------------------------


def main() -> None:
    """Print the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--crops", type=Path, default=Path("/tmp/cells_fp"), help="validation error crops")
    parser.add_argument("--scale-fields", type=int, default=8, help="validation fields for the scale check")
    parser.add_argument("--tta", choices=MODES, default="none",
                        help="the engine's test-time augmentation")
    args = parser.parse_args()
    engine = open_engine(args.model, args.tta)
    train, val, boxes = load_bccd()
    print(f"# Whole-engine study\n\nModel: `{engine.model.path.name}` on the CPU, 1 thread, test-time "
          f"augmentation {engine.model.tta}. "
          f"BCCD: {len(train)} training, {len(val)} validation fields; WBC boxes: "
          f"{sum(len(boxes.get(n, [])) for n in train)} / {sum(len(boxes.get(n, [])) for n in val)}.\n")

    print("## a. BCCD, result cells' boxes vs WBC boxes (IoU >= 0.5)\n")
    print("| split | recall | precision | TP | FP | FN | TP IoU median | TP IoU < 0.7 "
          "| finder alone: recall / precision | ms/field median | ms max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    runs: dict = {}
    val_errors: list = []
    results = {}
    for split, names in (("train", train), ("val", val)):
        r = bccd_split(engine, names, boxes, runs, val_errors if split == "val" else None)
        results[split] = r
        print(f"| {split} | {r['recall']:.3f} | {r['precision']:.3f} | {r['tp']} | {r['fp']} | {r['fn']} "
              f"| {r['iou_median']:.2f} | {r['iou_low']} | {r['f_recall']:.3f} / {r['f_precision']:.3f} "
              f"| {r['ms']:.0f} | {r['ms_max']:.0f} |")
    for split in ("val", "train"):
        print(f"\nErrors, {split} (best IoU with the other side's boxes; FP: result cell box, "
              f"area px, score):\n")
        for name, kind, box, best, cell in results[split]["errors"]:
            extra = f", area {cell.areas_px['cell']}, score {cell.score}" if cell else ""
            print(f"- {name} {kind} box {box} best IoU {best:.2f}{extra}")
    saved = save_review(val_errors, runs, args.crops)
    save_review(results["train"]["errors"], runs, args.crops / "train")
    print(f"\nValidation error crops in {args.crops}: {', '.join(saved) or 'none'} "
          f"(training ones in {args.crops / 'train'})\n")

    print("## b. Zheng validation crops in 4x4 mosaics (128 px tiles)\n")
    print("Arrangements: *sorted* (names sorted: mosaics 1-3 dataset1, 4 dataset2), *listed* (the "
          "shuffled order of model.json, dataset1 first: other groups of 16) and *sorted, balanced* (as "
          "sorted, each tile's background scaled to the same white: a diagnostic, not a target).\n")
    print("| order | mosaic | crops | found (IoU >= 0.5) | result cells | extra | mean cell Dice (matched) "
          "| min | mean nucleus Dice | same tiles alone: mean cell Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    notes, summary = [], []
    for order in ("sorted", "listed", "sorted, balanced"):
        entries = zheng_val_names(order.split(",")[0])
        all_dice, hits = [], []
        for m in range(len(entries) // 16):
            chunk = entries[m * 16:(m + 1) * 16]
            r = mosaic_check(engine, chunk, order.endswith("balanced"))
            all_dice += r["cell_dice"]
            hits.append(r["found"])
            sources = "+".join(f"{sum(e.startswith(s) for e in chunk)} {s}" for s in ("dataset1", "dataset2")
                               if any(e.startswith(s) for e in chunk))
            print(f"| {order} | {m + 1} | {sources} | {r['found']}/16 | {r['cells']} "
                  f"| {r['extra']} | {np.mean(r['cell_dice']):.3f} | {np.min(r['cell_dice']):.3f} "
                  f"| {np.mean(r['nucleus_dice']):.3f} | {np.mean(r['alone_dice']):.3f} |")
            notes.append(f"- {order} {m + 1} ({', '.join(chunk)}): missed {r['missed'] or 'none'}; extra "
                         f"cells' best IoU {r['extra_iou'] or '-'}; lowest Dice "
                         f"{[(e, round(d, 3)) for d, e in r['low']]}")
        summary.append(f"- {order}: found {sum(hits)}/{16 * len(hits)} ({hits}); mean cell Dice of matched "
                       f"cells {np.mean(all_dice):.3f} over {len(all_dice)} cells")
    print("\n" + "\n".join(summary) + "\n\n" + "\n".join(notes) + "\n")

    print("## c. Scale (BCCD validation fields at 0.5x / 1x / 2x)\n")
    print("| field | WBC | cells 0.5x / 1x / 2x | 1x cell areas px | area/scale² ÷ 1x area at 0.5x "
          "| at 2x | within 10 % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    step = max(1, len(val) // args.scale_fields)
    ok_fields = 0
    fields = sorted(set(val[::step][:args.scale_fields]) | {n for n in val if len(boxes.get(n, [])) > 1})
    for name in fields:
        r = scale_check(engine, name)
        counts = r["counts"]
        flat = [x for f in r["ratios"] for x in r["ratios"][f]]
        same = len(set(counts.values())) == 1
        within = same and all(x is not None and abs(x - 1) <= AREA_TOLERANCE for x in flat)
        ok_fields += within

        def show(row):
            return ", ".join("unmatched" if x is None else f"{x:.2f}" for x in row) or "-"

        print(f"| {name[:-4]} | {len(boxes.get(name, []))} | {counts[0.5]} / {counts[1.0]} / {counts[2.0]} "
              f"| {', '.join(map(str, r['areas_1x']))} | {show(r['ratios'][0.5])} | {show(r['ratios'][2.0])} "
              f"| {'yes' if within else 'no'} |")
    print(f"\nSame count and every area within 10 %: {ok_fields} of {len(fields)} fields.\n")

    print("## d. No leukocyte (largest WBC-free strip >= 200x200 of each validation field)\n")
    bad, total, details = empty_check(engine, val, boxes, args.crops)
    print(f"Strips with a cell: {bad} of {total}.\n")
    for name, size, cells in details:
        print(f"- {name} strip {size[0]}x{size[1]}: cells (bbox, area px, score) {cells}")


if __name__ == "__main__":
    main()
