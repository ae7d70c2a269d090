"""One upload's way through the service: decode → preprocess → queued inference → mask → measure → encode.

Decoding, pre- and postprocessing and encoding run on worker threads bounded by a capacity limiter;
inference runs on the batcher's thread. The event loop only waits.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from anyio import CapacityLimiter

from app.batching import InferenceResult, MicroBatcher, Ticket
from app.errors import OverloadedError, ServiceError
from app.imaging import decode_image, encode_mask_png, encode_overlay_png
from app.inference import Segmenter
from app.measure import Measurements, measure
from app.metrics import Metrics

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """What to produce for each image."""

    pixel_size_um: float | None = None
    mask_png: bool = False
    overlay_png: bool = False


@dataclass(frozen=True)
class Upload:
    """A received file; `error` is set when it was refused before decoding (too large)."""

    filename: str
    data: bytes
    error: ServiceError | None = None


@dataclass(frozen=True)
class Prepared:
    """The network input `(3, h, w)` of one image and the image's own (height, width)."""

    tensor: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class Outcome:
    """A segmented image: its measurements and the encoded outputs that were asked for."""

    filename: str
    measurements: Measurements
    inference_ms: float
    mask_png: bytes | None = None
    overlay_png: bytes | None = None


@dataclass(frozen=True)
class Failure:
    """A file that could not be processed, and why."""

    filename: str
    error: ServiceError


class Pipeline:
    """Segments uploads with a `Segmenter` whose runs go through a `MicroBatcher`."""

    def __init__(self, segmenter: Segmenter, batcher: MicroBatcher, limiter: CapacityLimiter,
                 max_pixels: int, metrics: Metrics) -> None:
        self.segmenter = segmenter
        self.batcher = batcher
        self.limiter = limiter
        self.max_pixels = max_pixels
        self.metrics = metrics

    def prepare(self, data: bytes) -> Prepared:
        """Decode and preprocess one file (blocking)."""
        image = decode_image(data, self.max_pixels)
        return Prepared(self.segmenter.preprocess(image), (image.height, image.width))

    def finish(self, upload: Upload, prepared: Prepared, logits: np.ndarray, inference_ms: float,
               options: Options) -> Outcome:
        """Mask at the image's size, measurements and the requested PNGs (blocking)."""
        mask = self.segmenter.postprocess(logits, prepared.size)
        overlay = None
        if options.overlay_png:
            # Decoded again rather than held since preprocessing: a batch then never keeps every
            # full-size image in memory at once.
            image = np.asarray(decode_image(upload.data, self.max_pixels))
            overlay = encode_overlay_png(image, mask)
        return Outcome(upload.filename, measure(mask, options.pixel_size_um), inference_ms,
                       encode_mask_png(mask) if options.mask_png else None, overlay)

    def prepare_and_submit(self, data: bytes, ticket: Ticket,
                           then: Callable[[Prepared, InferenceResult], Outcome] | None = None,
                           ) -> tuple[Prepared, Future[Any]]:
        """Decode, preprocess and queue one file for inference (blocking), with no detour via the event
        loop between preprocessing and the queue; `then(prepared, result)` runs after the run, on the
        inference worker."""
        prepared = self.prepare(data)
        follow_up = None if then is None else functools.partial(then, prepared)
        return prepared, self.batcher.submit(prepared.tensor[None], ticket, follow_up)

    async def segment(self, upload: Upload, options: Options) -> Outcome:
        """Segment one upload; its domain errors propagate.

        With several inference workers the mask and measurements are made by the worker that ran the
        model, right after the run (a fraction of a millisecond, while the other worker can take the
        next run), which spares the request two thread hand-overs; with one worker they go to a CPU
        worker thread so that the next run is not delayed.
        """
        inline = self.batcher.workers > 1
        then = functools.partial(self._finish_inline, upload, options) if inline else None
        with self.batcher.expecting() as ticket:
            prepared, pending = await self._checked(
                functools.partial(self.prepare_and_submit, ticket=ticket, then=then), upload)
        done = await asyncio.wrap_future(pending)
        if inline:
            return self._count(done)
        return self._count(await self.run_blocking(self.finish, upload, prepared, done.logits[0], done.run_ms,
                                                   options))

    def _finish_inline(self, upload: Upload, options: Options, prepared: Prepared,
                       result: InferenceResult) -> Outcome:
        return self.finish(upload, prepared, result.logits[0], result.run_ms, options)

    async def segment_batch(self, uploads: list[Upload], options: Options) -> list[Outcome | Failure]:
        """Segment many uploads; a file that fails becomes a `Failure` in its place, in upload order.

        Files go through in groups of `max_batch_size`, each decoded, run and encoded as one piece of
        work, so that one group's decoding or encoding overlaps another's inference.

        Raises:
            OverloadedError: the inference queue is full.
        """
        size = self.batcher.max_batch_size
        with self.batcher.expecting():
            tasks = [asyncio.ensure_future(self._segment_group(uploads[i:i + size], options))
                     for i in range(0, len(uploads), size)]
            try:
                groups = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        return [item for group in groups for item in group]

    def prepare_group(self, uploads: list[Upload]) -> tuple[list[Prepared | Failure], np.ndarray | None]:
        """Decode and preprocess files (blocking); also the stacked inputs of those that could be."""
        items = [self._prepare_or_fail(upload) for upload in uploads]
        tensors = [item.tensor for item in items if isinstance(item, Prepared)]
        return items, np.stack(tensors) if tensors else None

    def finish_group(self, uploads: list[Upload], items: list[Prepared | Failure], result: InferenceResult,
                     options: Options) -> list[Outcome | Failure]:
        """`finish` every prepared file of a group with its logits, in order (blocking)."""
        logits = iter(result.logits)
        return [item if isinstance(item, Failure) else self._count(
                    self.finish(upload, item, next(logits), result.run_ms, options))
                for upload, item in zip(uploads, items, strict=True)]

    async def run_blocking(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` on a worker thread, within the pipeline's thread limit."""
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def _segment_group(self, uploads: list[Upload], options: Options) -> list[Outcome | Failure]:
        items, images = await self.run_blocking(self.prepare_group, uploads)
        if images is None:  # every file failed
            return [item for item in items if isinstance(item, Failure)]
        result = await asyncio.wrap_future(self.batcher.submit(images))
        return await self.run_blocking(self.finish_group, uploads, items, result, options)

    async def _checked(self, function: Callable[[bytes], T], upload: Upload) -> T:
        """`function(upload.data)` on a worker thread; a refused file is counted before its error goes on."""
        try:
            if upload.error is not None:
                raise upload.error
            return await self.run_blocking(function, upload.data)
        except ServiceError as exc:
            if not isinstance(exc, OverloadedError):
                self.metrics.images.labels("rejected").inc()
            raise

    def _prepare_or_fail(self, upload: Upload) -> Prepared | Failure:
        try:
            if upload.error is not None:
                raise upload.error
            return self.prepare(upload.data)
        except ServiceError as exc:
            self.metrics.images.labels("rejected").inc()
            return Failure(upload.filename, exc)

    def _count(self, outcome: Outcome) -> Outcome:
        self.metrics.images.labels("ok").inc()
        return outcome
