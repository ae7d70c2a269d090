"""Leukocyte finder study: compare box-finding methods on BCCD and check them on Zheng crops.

Run: ``.venv/bin/python benchmarks/finder_study.py [--tune] [--crops DIR]``; prints a Markdown report.

Split: BCCD images sorted by name, every 4th (index % 4 == 3) is validation, the rest training.
Rules are tuned (``--tune``) on the training split only; the report gives validation numbers.
Matching: greedy by descending IoU, a found box counts as a true positive at IoU >= 0.5 with a
still-unmatched WBC box.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.locate import Params, detect

cv2.setNumThreads(1)
BCCD = Path("/work/shared/datasets/bccd")
ZHENG = Path("/work/shared/datasets/wbc-zheng2018")
METHODS = {
    "A fixed growth": Params(adaptive=False),  # the default of find_leukocytes
    "B scale-relative (red-cell radius)": Params(adaptive=True),
}
CHOSEN = "A fixed growth"


def load_bccd() -> tuple[list[str], list[str], dict[str, list[tuple[int, int, int, int]]]]:
    """Training names, validation names, and WBC boxes (x0, y0, x1, y1) per image."""
    boxes: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    with open(BCCD / "annotations.csv") as handle:
        for row in csv.DictReader(handle):
            if row["label"] == "WBC":
                boxes[row["image"]].append(tuple(int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    names = sorted(p.name for p in (BCCD / "images").glob("*.jpg"))
    val = [n for i, n in enumerate(names) if i % 4 == 3]
    train = [n for i, n in enumerate(names) if i % 4 != 3]
    return train, val, boxes


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8."""
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def corners(candidate) -> tuple[int, int, int, int]:
    """Candidate bbox as (x0, y0, x1, y1)."""
    x, y, w, h = candidate.bbox
    return (x, y, x + w, y + h)


def match(found, truth, threshold=0.5):
    """Greedy matching; returns (matched pairs, unmatched found indices, unmatched truth indices)."""
    pairs = sorted(
        ((iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True
    )
    used_f, used_t, matched = set(), set(), []
    for value, i, j in pairs:
        if value >= threshold and i not in used_f and j not in used_t:
            used_f.add(i), used_t.add(j), matched.append((i, j, value))
    return matched, [i for i in range(len(found)) if i not in used_f], [
        j for j in range(len(truth)) if j not in used_t
    ]


@dataclass
class Tally:
    """Found boxes matched to true ones (`match`), summed over images: recall and precision."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, found, truth, threshold=0.5):
        """Match one image's boxes, count them, and return `match`'s result."""
        matched, extra, missed = match(found, truth, threshold)
        self.tp += len(matched)
        self.fp += len(extra)
        self.fn += len(missed)
        return matched, extra, missed

    @property
    def recall(self) -> float:
        return self.tp / max(1, self.tp + self.fn)

    @property
    def precision(self) -> float:
        return self.tp / max(1, self.tp + self.fp)

    def summary(self) -> dict:
        return {"recall": self.recall, "precision": self.precision, "tp": self.tp, "fp": self.fp,
                "fn": self.fn}

    def __str__(self) -> str:
        return f"{self.recall:.3f} / {self.precision:.3f}"


def evaluate(names, boxes, params, images, keep=None) -> dict:
    """Recall, precision and ms per image of one method on some BCCD images."""
    tally = Tally()
    elapsed = []
    for name in names:
        rgb = images[name]
        start = time.perf_counter()
        found = [corners(c) for c in detect(rgb, None, params)]
        elapsed.append(time.perf_counter() - start)
        _, extra, missed = tally.add(found, boxes.get(name, []))
        if keep is not None:
            keep.extend([(name, "FP", found[i]) for i in extra])
            keep.extend([(name, "FN", boxes[name][j]) for j in missed])
    return {
        **tally.summary(),
        "ms": 1000 * float(np.median(elapsed)),
        "ms_max": 1000 * float(np.max(elapsed)),
    }


def tune(train, boxes, images, base: Params) -> Params:
    """Grid search of the scale-relative rules on the training split (F1, then recall)."""
    # Listed shipped value first: ties keep it.
    grid = {"min_area": [0.2, 0.1, 0.3], "margin": [0.45, 0.35, 0.55], "min_cell": [0.8, 1.2, 1.4]}
    if not base.adaptive:
        grid = {"min_area": [0.2, 0.1, 0.3], "fixed_growth": [0.2, 0.15, 0.25, 0.1, 0.3]}
    best, best_key = base, (-1.0,)
    for values in itertools.product(*grid.values()):
        params = replace(base, **dict(zip(grid, values, strict=True)))
        r = evaluate(train, boxes, params, images)
        f1 = 2 * r["recall"] * r["precision"] / max(1e-9, r["recall"] + r["precision"])
        if (f1, r["recall"]) > best_key:
            best, best_key = params, (f1, r["recall"])
    return best


def save_errors(errors, images, folder: Path) -> None:
    """Crops (with some context) of every validation error, for review."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, kind, (x0, y0, x1, y1)) in enumerate(errors):
        rgb = images[name].copy()
        cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 255, 0) if kind == "FN" else (255, 0, 0), 2)
        h, w = rgb.shape[:2]
        crop = rgb[max(0, y0 - 40):min(h, y1 + 40), max(0, x0 - 40):min(w, x1 + 40)]
        path = folder / f"{index:03d}_{kind}_{name[:-4]}.png"
        cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))


def zheng_check(dataset: str, params: Params) -> dict:
    """Fraction of crops where exactly one candidate covers the centre, and its IoU with the mask box."""
    exactly_one, ious, total = 0, [], 0
    for path in sorted((ZHENG / dataset / "images").glob("*.bmp")):
        rgb = read_rgb(path)
        mask = cv2.imread(str(ZHENG / dataset / "masks" / (path.stem + ".png")), cv2.IMREAD_GRAYSCALE)
        ys, xs = np.nonzero(mask > 64)
        truth = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        h, w = mask.shape
        found = [corners(c) for c in detect(rgb, None, params)]
        centre = [f for f in found if f[0] <= w / 2 <= f[2] and f[1] <= h / 2 <= f[3]]
        total += 1
        if len(centre) == 1:
            exactly_one += 1
            ious.append(iou(centre[0], truth))
    ious_a = np.array(ious) if ious else np.zeros(1)
    return {"n": total, "one": exactly_one, "iou_median": float(np.median(ious_a)),
            "iou_ge_05": int((ious_a >= 0.5).sum())}


def mosaic_check(params: Params) -> tuple[int, int]:
    """4x4 mosaic of 16 dataset1 crops, each 128x128: (found at IoU >= 0.5, candidates)."""
    paths = sorted((ZHENG / "dataset1" / "images").glob("*.bmp"))[:16]
    tiles, truths = [], []
    for k, path in enumerate(paths):
        rgb = cv2.resize(read_rgb(path), (128, 128), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(cv2.imread(str(ZHENG / "dataset1" / "masks" / (path.stem + ".png")), 0),
                          (128, 128), interpolation=cv2.INTER_NEAREST)
        ys, xs = np.nonzero(mask > 64)
        ox, oy = 128 * (k % 4), 128 * (k // 4)
        tiles.append(rgb)
        truths.append((xs.min() + ox, ys.min() + oy, xs.max() + 1 + ox, ys.max() + 1 + oy))
    rows = [np.hstack(tiles[r * 4:(r + 1) * 4]) for r in range(4)]
    found = [corners(c) for c in detect(np.vstack(rows), None, params)]
    matched, _, _ = match(found, truths)
    return len(matched), len(found)


def scale_check(name: str, images, params: Params) -> dict[float, int]:
    """Number of candidates on one field resized 0.5x, 1x, 2x."""
    counts = {}
    for factor in (0.5, 1.0, 2.0):
        rgb = cv2.resize(images[name], None, fx=factor, fy=factor,
                         interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        counts[factor] = len(detect(rgb, None, params))
    return counts


def empty_checks(names, boxes, images, params: Params) -> tuple[int, int]:
    """Largest WBC-free region (at least 200x200) of each field: (fields with a candidate, fields)."""
    bad = total = 0
    for name in names:
        strip = free_strip(images[name], boxes.get(name, []))
        if strip is None:
            continue
        total += 1
        bad += bool(detect(strip, None, params))
    return bad, total


def free_strip(rgb: np.ndarray, wbc_boxes) -> np.ndarray | None:
    """The largest region (at least 200 x 200) of a field that keeps 10 px away from every WBC box."""
    h, w = rgb.shape[:2]
    free = np.ones((h, w), bool)
    for x0, y0, x1, y1 in wbc_boxes:
        free[max(0, y0 - 10):y1 + 10, max(0, x0 - 10):x1 + 10] = False
    region = _largest_free_rectangle(free)
    if region is None:
        return None
    x0, y0, x1, y1 = region
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def _largest_free_rectangle(free: np.ndarray):
    """Largest of the four side strips (left/right/top/bottom) that is entirely free, if >= 200x200."""
    h, w = free.shape
    options = []
    cols, rows = free.all(axis=0), free.all(axis=1)
    left = int(np.argmin(cols)) if not cols.all() else w
    right = w - int(np.argmin(cols[::-1])) if not cols.all() else 0
    top = int(np.argmin(rows)) if not rows.all() else h
    bottom = h - int(np.argmin(rows[::-1])) if not rows.all() else 0
    options += [(0, 0, left, h), (right, 0, w, h), (0, 0, w, top), (0, bottom, w, h)]
    options = [o for o in options if o[2] - o[0] >= 200 and o[3] - o[1] >= 200]
    return max(options, key=lambda o: (o[2] - o[0]) * (o[3] - o[1])) if options else None


def main() -> None:
    """Print the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true", help="grid-search rules on the training split")
    parser.add_argument("--crops", default="/tmp/finder_fp", help="folder for validation error crops")
    args = parser.parse_args()
    train, val, boxes = load_bccd()
    images = {n: read_rgb(BCCD / "images" / n) for n in train + val}
    methods = dict(METHODS)
    if args.tune:
        methods = {name: tune(train, boxes, images, p) for name, p in methods.items()}
    n_val = sum(len(boxes.get(n, [])) for n in val)
    print(f"# Leukocyte finder study\n\nBCCD: {len(train)} training, {len(val)} validation fields "
          f"(every 4th by sorted name); WBC boxes: {n_val} in validation.\n")
    print("| method | split | recall | precision | TP | FP | FN | ms/image (median) | ms max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    errors = []
    for name, params in methods.items():
        for split, names in (("train", train), ("val", val)):
            keep = errors if split == "val" and name == CHOSEN else None
            r = evaluate(names, boxes, params, images, keep)
            print(f"| {name} | {split} | {r['recall']:.3f} | {r['precision']:.3f} | {r['tp']} | {r['fp']} "
                  f"| {r['fn']} | {r['ms']:.1f} | {r['ms_max']:.1f} |")
    print("\nRules used:\n")
    for name, params in methods.items():
        print(f"- {name}: `{params}`")
    save_errors(errors, images, Path(args.crops))
    print(f"\nValidation errors of the chosen method saved to {args.crops}: "
          + ", ".join(f"{k} {n}" for k, n in _count_kinds(errors).items()) + "\n")
    for method, params in methods.items():
        for dataset in ("dataset1", "dataset2"):
            z = zheng_check(dataset, params)
            print(f"- {method}, Zheng {dataset}: exactly one candidate over the centre in "
                  f"{z['one']}/{z['n']}; its IoU with the mask's cell box: median "
                  f"{z['iou_median']:.2f}, >= 0.5 in {z['iou_ge_05']}")
    chosen = methods[CHOSEN]
    print(f"\nChecks below use {CHOSEN}.\n")
    hits, count = mosaic_check(chosen)
    print(f"- 4x4 mosaic of dataset1 crops (512x512): {hits}/16 found at IoU >= 0.5, {count} candidates")
    for name in (val[0], val[1], val[5]):
        print(f"- scale, {name} ({len(boxes.get(name, []))} WBC): candidates at 0.5x/1x/2x = "
              f"{scale_check(name, images, chosen)}")
    bad, total = empty_checks(val, boxes, images, chosen)
    print(f"- WBC-free strips (>= 200x200 px) of validation fields: a candidate in {bad} of {total}")


def _count_kinds(errors) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for _, kind, _ in errors:
        counts[kind] += 1
    return dict(counts)


if __name__ == "__main__":
    main()
