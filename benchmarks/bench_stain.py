"""What the stain normalisation adds to preparing one network input: `InputTransform` of the shipped model
with and without its stain normalisation, interleaved on the same images, beside one session run.

    .venv/bin/python benchmarks/bench_stain.py [--model weights/model.onnx] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.contract import ModelMetadata
from app.engine.session import Model, ModelConfig
from app.engine.transform import InputTransform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("weights/model.onnx"))
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    meta = ModelMetadata.for_model(args.model)
    if meta.stain is None:
        raise SystemExit(f"{args.model} has no stain normalisation")
    with_stain = InputTransform.from_metadata(meta)
    without = InputTransform.create(meta.input.size, meta.normalization)
    model = Model.open(ModelConfig(args.model, device="cpu", intra_op_threads=1, inference_workers=1))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path("examples").glob("*.png"))]
    times: dict[str, list[float]] = {"without": [], "with": [], "run": []}
    for i in range(args.rounds):
        image = images[i % len(images)]
        for name, transform in (("without", without), ("with", with_stain)):
            started = time.perf_counter()
            x = transform(image)
            times[name].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        model.run(x[None])
        times["run"].append((time.perf_counter() - started) * 1000)
    ms = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model} ({model.path.name}), {len(images)} images, {args.rounds} rounds, medians, 1 thread:")
    print(f"- InputTransform without stain normalisation: {ms['without']:.2f} ms")
    print(f"- InputTransform with stain normalisation:    {ms['with']:.2f} ms "
          f"(+{ms['with'] - ms['without']:.2f} ms, {ms['with'] / ms['without']:.2f}x)")
    print(f"- one session run, batch 1:                   {ms['run']:.2f} ms "
          f"(the normalisation adds {100 * (ms['with'] - ms['without']) / ms['run']:.1f} % of a run)")


if __name__ == "__main__":
    main()
