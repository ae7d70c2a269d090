"""Test-time augmentation's cost: `Engine.segment` with `none`, `mirror` (4 runs) and `dihedral` (8 runs)
side by side, round after round, on a shipped crop and on a generated 640 × 480 field with three
leukocytes. Prints a Markdown table of median milliseconds and each mode's ratio to `none`.

    .venv/bin/python benchmarks/bench_tta.py [--model weights/model.onnx] [--rounds 5] [--threads 1]

The model file is served as the engine would serve it on the CPU (`precision=auto`: the int8 variant
when there is one that passes its checks). Whether the augmentation pays for itself in Dice is in
docs/results.md ("Test-time augmentation").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.engine import Options, Upload  # noqa: E402
from app.engine.augment import MODES  # noqa: E402
from benchmarks.bench_cells import open_engine, png_bytes  # noqa: E402
from model_training.synthetic import THREE_CELLS, make_field  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "model.onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    engines = {mode: open_engine(args.model, mode, args.threads) for mode in MODES}
    cases = {"crop (examples/cellavision_050.png)": (REPO / "examples" / "cellavision_050.png").read_bytes(),
             "generated 640 × 480 field, 3 leukocytes": png_bytes(make_field(THREE_CELLS)[0])}
    times: dict[tuple[str, str], list[float]] = {(c, m): [] for c in cases for m in MODES}
    cells: dict[tuple[str, str], int] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for case, data in cases.items():
            for mode, engine in engines.items():
                started = time.perf_counter()
                result = engine.segment(Upload("x.png", data), Options())
                times[(case, mode)].append(1000 * (time.perf_counter() - started))
                cells[(case, mode)] = len(result.cells)  # type: ignore[union-attr]
    model = next(iter(engines.values())).model
    load = os.getloadavg()
    print(f"# Test-time augmentation: cost\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"`{model.path.name}` ({model.metadata.version}), CPU, {args.threads} thread(s), "
          f"{args.rounds} rounds after one warm-up, medians; load average {load[0]:.2f} on "
          f"{os.cpu_count()} CPUs.\n")
    print("| case | " + " | ".join(f"{m} ms" for m in MODES) + " | mirror ÷ none | dihedral ÷ none | cells |")
    print("| --- | " + " | ".join("---" for _ in MODES) + " | --- | --- | --- |")
    for case in cases:
        med = {m: statistics.median(times[(case, m)][1:]) for m in MODES}
        print(f"| {case} | " + " | ".join(f"{med[m]:.0f}" for m in MODES)
              + f" | {med['mirror'] / med['none']:.2f} | {med['dihedral'] / med['none']:.2f} | "
              + " / ".join(str(cells[(case, m)]) for m in MODES) + " |")


if __name__ == "__main__":
    main()
