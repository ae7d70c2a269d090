"""The model in the benchmark's own process: the baseline the service is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.engine import Engine, Model, Options, Upload
from app.engine.contract import ModelMetadata
from app.engine.imaging import decode_image
from app.engine.labels import labels_at_size
from app.engine.measure import measure
from app.engine.session import session_options
from app.engine.transform import InputTransform
from benchmarks.service_client import Stats, run_together, timed


class RawSession:
    """The model in this process: onnxruntime with the engine's session options, no service around it."""

    def __init__(self, model: Path, images: list[tuple[str, bytes]]) -> None:
        self.model = model
        self.transform = InputTransform.from_metadata(ModelMetadata.for_model(model))
        self.session = ort.InferenceSession(str(model), session_options(),
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.images = images
        self.tensors = [self.transform(decode_image(data, 10**9)) for _, data in images]

    def bench(self, count: int, batch: int) -> Stats:
        """`count` images in runs of `batch` (inputs stacked beforehand: only the runs are timed)."""
        inputs = [np.stack([self.tensors[(r * batch + i) % len(self.tensors)] for i in range(batch)])
                  for r in range(len(self.tensors))]
        self.session.run(None, {self.input: inputs[0]})
        latencies = []
        started = time.perf_counter()
        for r in range(max(1, count // batch)):
            x = inputs[r % len(inputs)]
            latencies.append(timed(lambda: self.session.run(None, {self.input: x})))  # noqa: B023
        return Stats(len(latencies) * batch, time.perf_counter() - started, latencies)

    @cached_property
    def one_thread(self) -> ort.InferenceSession:
        """The other way to use two cores: a session on one thread, called from several threads at once."""
        return ort.InferenceSession(str(self.model), session_options(1), providers=["CPUExecutionProvider"])

    def bench_side_by_side(self, count: int, callers: int) -> Stats:
        """`count` images, one per run, from `callers` threads at once on the one-thread session."""
        latencies: list[float] = []
        self.one_thread.run(None, {self.input: self.tensors[0][None]})

        def loop(offset: int) -> None:
            for i in range(count // callers):
                x = self.tensors[(offset + i) % len(self.tensors)][None]
                latencies.append(timed(lambda: self.one_thread.run(None, {self.input: x})))  # noqa: B023

        seconds = run_together(loop, callers)  # before len(latencies): the loops fill it
        return Stats(len(latencies), seconds, latencies)

    def bench_pipeline(self, count: int) -> Stats:
        """`count` images, one at a time, through everything the service does to one outside HTTP: the
        engine's `segment` (decode, find the cells, their windows on this session, stitch, measure)."""
        engine = Engine(Model(self.session, ModelMetadata.for_model(self.model), self.model), 10**9)

        def one(data: bytes) -> None:
            engine.segment(Upload("image", data), Options())

        latencies = []
        started = time.perf_counter()
        for i in range(count):
            data = self.images[i % len(self.images)][1]
            latencies.append(timed(lambda: one(data)))  # noqa: B023
        return Stats(count, time.perf_counter() - started, latencies)


    def stage_costs(self, rounds: int = 10) -> dict[str, float]:
        """CPU milliseconds per image of each stage of the in-process pipeline, over every image."""
        spent: dict[str, float] = {}

        def clock(name: str, function: Callable[..., Any], *args: Any) -> Any:
            started = time.process_time()
            result = function(*args)
            spent[name] = spent.get(name, 0.0) + time.process_time() - started
            return result

        for _ in range(rounds):
            for _, data in self.images:
                image = clock("decode", decode_image, data, 10**9)
                x = clock("preprocess", self.transform, image)
                logits = clock("session run", self.session.run, None, {self.input: x[None]})[0]
                mask = clock("mask at full size", labels_at_size, logits[0], (image.height, image.width))
                clock("measure", measure, mask)
        count = rounds * len(self.images)
        return {name: seconds * 1000 / count for name, seconds in spent.items()}
