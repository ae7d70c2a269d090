"""Finder alone (no model) on the checks of `cells_study.py`: Zheng mosaics, BCCD boxes, empty strips,
scale and time; optionally beside another version of `app/engine/locate.py` in the same run.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finder_mosaic_study.py [--baseline OLD_LOCATE.PY]``
(about 1 minute per finder version on one loaded core). ``--baseline`` loads a copy of an older
``locate.py`` (e.g. ``git show HEAD:app/engine/locate.py > /tmp/locate_old.py``) and reports both.

- Mosaics: the 64 Zheng validation crops of the shipped model, 128 x 128 each, 16 per 4 x 4 mosaic, in
  sorted and in listed order (as `cells_study.py`); a crop is found when a candidate box has IoU >= 0.5
  with its mask's cell box (greedy matching).
- BCCD: recall and precision of candidate boxes vs WBC boxes at IoU >= 0.5, training (index % 4 != 3)
  and validation split (as `finder_study.py`).
- Strips: the largest WBC-free side strip of each field (`finder_study.free_strip`); any candidate
  there is a false positive.
- Scale: candidates on validation fields at 0.5x, 1x, 2x (every 8th field and 00010).
- Time: median of `find_leukocytes` on a 640 x 480 field and on the same field resized to 1226 x 652.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import locate
from benchmarks.cells_study import mosaic, zheng_val_names
from benchmarks.finder_study import BCCD, Tally, corners, free_strip, load_bccd, match, read_rgb

cv2.setNumThreads(1)


def load_version(path: str) -> ModuleType:
    """A `locate.py` from another path as a module of its own."""
    spec = importlib.util.spec_from_file_location("locate_baseline", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def mosaics(finder: ModuleType) -> list[tuple[str, int, int, list[str]]]:
    """(grouping and index, crops found, candidates, missed crops) for the 8 mosaics."""
    rows = []
    for order in ("sorted", "listed"):
        names = zheng_val_names(order)
        for m in range(len(names) // 16):
            entries = names[16 * m:16 * (m + 1)]
            image, _, _, _, truth = mosaic(entries)
            found = [corners(c) for c in finder.find_leukocytes(image)]
            matched, _, missed = match(found, truth)
            rows.append((f"{order} {m + 1}", len(matched), len(found), [entries[j] for j in missed]))
    return rows


def bccd(finder: ModuleType, names, boxes, images) -> dict:
    """Recall and precision of candidate boxes vs WBC boxes."""
    tally = Tally()
    for name in names:
        tally.add([corners(c) for c in finder.find_leukocytes(images[name])], boxes.get(name, []))
    return tally.summary()


def strips(finder: ModuleType, names, boxes, images) -> tuple[int, int, list[str]]:
    """(strips with a candidate, strips, their names)."""
    bad, total = [], 0
    for name in names:
        strip = free_strip(images[name], boxes.get(name, []))
        if strip is None:
            continue
        total += 1
        if finder.find_leukocytes(strip):
            bad.append(name[-9:-4])
    return len(bad), total, bad


def scale(finder: ModuleType, names, images) -> list[tuple[str, list[int]]]:
    """Candidate counts at 0.5x, 1x, 2x."""
    rows = []
    for name in names:
        counts = []
        for f in (0.5, 1.0, 2.0):
            rgb = cv2.resize(images[name], None, fx=f, fy=f,
                             interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
            counts.append(len(finder.find_leukocytes(rgb)))
        rows.append((name[-9:-4], counts))
    return rows


def timing(finders: dict[str, ModuleType], field: np.ndarray, rounds: int = 15) -> dict[str, list[float]]:
    """Median ms of each finder on the field and on it resized to 1226 x 652, interleaved."""
    wide = cv2.resize(field, (1226, 652), interpolation=cv2.INTER_LINEAR)
    times: dict[str, list[list[float]]] = {k: [[], []] for k in finders}
    for _ in range(rounds):
        for key, finder in finders.items():
            for j, image in enumerate((field, wide)):
                start = time.perf_counter()
                finder.find_leukocytes(image)
                times[key][j].append(1000 * (time.perf_counter() - start))
    return {k: [float(np.median(v[0])), float(np.median(v[1]))] for k, v in times.items()}


def main() -> None:
    """Print a Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", help="path of another locate.py to report beside the current one")
    parser.add_argument("--quick", action="store_true", help="mosaics and strips only")
    args = parser.parse_args()
    finders = {"current": locate}
    if args.baseline:
        finders = {"baseline": load_version(args.baseline), "current": locate}
    train, val, boxes = load_bccd()
    images = {n: read_rgb(BCCD / "images" / n) for n in train + val}
    scale_names = sorted(set(val[::8]) | {"BloodImage_00010.jpg"})
    for key, finder in finders.items():
        print(f"\n## {key}\n")
        print("| mosaic | found | candidates | missed |\n| --- | --- | --- | --- |")
        total = {"sorted": 0, "listed": 0}
        for label, found, cands, missed in mosaics(finder):
            total[label.split()[0]] += found
            print(f"| {label} | {found}/16 | {cands} | {', '.join(missed)} |")
        print(f"\nAll: sorted {total['sorted']}/64, listed {total['listed']}/64\n")
        for split, names in (("train", train), ("val", val)):
            bad, n, which = strips(finder, names, boxes, images)
            print(f"- strips with a candidate, {split}: {bad}/{n} {' '.join(which)}")
        if args.quick:
            continue
        for split, names in (("train", train), ("val", val)):
            r = bccd(finder, names, boxes, images)
            print(f"- BCCD {split}: recall {r['recall']:.3f}, precision {r['precision']:.3f} "
                  f"(TP {r['tp']}, FP {r['fp']}, FN {r['fn']})")
        rows = scale(finder, scale_names, images)
        same = sum(len(set(c)) == 1 for _, c in rows)
        print(f"- scale 0.5x/1x/2x: same count in {same}/{len(rows)}: "
              + ", ".join(f"{n} {'/'.join(map(str, c))}" for n, c in rows))
    if not args.quick:
        ms = timing(finders, images["BloodImage_00005.jpg"])
        print("\n| finder | ms 640x480 | ms 1226x652 |\n| --- | --- | --- |")
        for key, (a, b) in ms.items():
            print(f"| {key} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
