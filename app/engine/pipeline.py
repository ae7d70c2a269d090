"""The engine's entry point: bytes in, a `Result` (measurements, encoded mask and overlay) or a `Failure`.

`Engine.segment` and `Engine.segment_many` are plain blocking functions. The folder command calls them
in process; the service calls them on worker threads with `infer` routed through its batcher, so that
concurrent requests share model runs. Nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.engine.contract import ModelMetadata
from app.engine.errors import ServiceError
from app.engine.imaging import decode_image, encode_mask_png, encode_overlay_png
from app.engine.labels import labels_at_size
from app.engine.measure import Measurements, measure
from app.engine.session import Model, ModelConfig
from app.engine.transform import InputTransform

#: `(N, 3, h, w)` float32 network inputs → `(N, C, h, w)` logits and the milliseconds of the run(s).
Infer = Callable[[np.ndarray], tuple[np.ndarray, float]]


@dataclass(frozen=True)
class Options:
    """What to produce for each image."""

    pixel_size_um: float | None = None
    mask_png: bool = False
    overlay_png: bool = False


@dataclass(frozen=True)
class Result:
    """A segmented image: its measurements and the encoded outputs that were asked for."""

    filename: str
    measurements: Measurements
    inference_ms: float
    model: dict[str, str]
    mask_png: bytes | None = None
    overlay_png: bytes | None = None


@dataclass(frozen=True)
class Failure:
    """A file that could not be processed, and why."""

    filename: str
    error: ServiceError


@dataclass(frozen=True)
class Upload:
    """A file to segment; `error` is set when it was refused before it reached the engine (too large)."""

    filename: str
    data: bytes
    error: ServiceError | None = None


@dataclass(frozen=True)
class _Prepared:
    """A decoded image `(H, W, 3)` uint8 and its network input `(3, h, w)`."""

    pixels: np.ndarray
    tensor: np.ndarray


class Engine:
    """Decode → preprocess → infer → labels at the image's size → measure → encode, for one model.

    Args:
        model: the loaded model.
        max_pixels: largest width × height accepted (checked from the file's header).
    """

    def __init__(self, model: Model, max_pixels: int) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self.transform = InputTransform.from_metadata(model.metadata)

    @classmethod
    def open(cls, config: ModelConfig, max_pixels: int) -> Engine:
        """Load the model (see `Model.open`)."""
        return cls(Model.open(config), max_pixels)

    @property
    def metadata(self) -> ModelMetadata:
        """The served model's metadata."""
        return self.model.metadata

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """The model run in this thread (see `Infer`)."""
        started = time.perf_counter()
        logits = self.model.run(images)
        return logits, (time.perf_counter() - started) * 1000.0

    def segment(self, upload: Upload, options: Options, infer: Infer | None = None) -> Result | Failure:
        """Segment one file; a file that cannot be decoded becomes a `Failure`.

        Args:
            upload: the file.
            options: what to produce.
            infer: how to run the model (default: `self.infer`, in this thread).

        Raises:
            Whatever `infer` raises (the service's batcher: overloaded, shutting down).
        """
        return self.segment_many([upload], options, infer)[0]

    def segment_many(self, uploads: Sequence[Upload], options: Options,
                     infer: Infer | None = None) -> list[Result | Failure]:
        """Segment files in upload order, in groups of the model's batch size, each group one model run;
        a file that fails becomes a `Failure` in its place and never stops the others."""
        results: list[Result | Failure] = []
        size = self.model.max_batch_size
        for start in range(0, len(uploads), size):
            results += self._segment_group(uploads[start:start + size], options, infer or self.infer)
        return results

    def _segment_group(self, uploads: Sequence[Upload], options: Options,
                       infer: Infer) -> list[Result | Failure]:
        items = [self._prepare(upload) for upload in uploads]
        prepared = [item for item in items if isinstance(item, _Prepared)]
        if not prepared:
            return [item for item in items if isinstance(item, Failure)]
        logits, run_ms = infer(np.stack([item.tensor for item in prepared]))
        outputs = iter(logits)
        return [item if isinstance(item, Failure) else self._finish(upload.filename, item, next(outputs),
                                                                      run_ms, options)
                for upload, item in zip(uploads, items, strict=True)]

    def _prepare(self, upload: Upload) -> _Prepared | Failure:
        try:
            if upload.error is not None:
                raise upload.error
            image = decode_image(upload.data, self.max_pixels)
        except ServiceError as exc:
            return Failure(upload.filename, exc)
        return _Prepared(np.asarray(image), self.transform(image))

    def _finish(self, filename: str, prepared: _Prepared, logits: np.ndarray, run_ms: float,
                options: Options) -> Result:
        mask = labels_at_size(logits, prepared.pixels.shape[:2])
        return Result(filename, measure(mask, options.pixel_size_um), run_ms, self.metadata.ref,
                      encode_mask_png(mask) if options.mask_png else None,
                      encode_overlay_png(prepared.pixels, mask) if options.overlay_png else None)
