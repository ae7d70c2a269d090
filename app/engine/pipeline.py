"""The engine's entry point: bytes in, a `Result` (every leukocyte and its measurements, the encoded
masks) or a `Failure`.

Per image: decode, find the leukocytes (`locate`), cut a window around each at the model's scale
(`cells`), run every window of the image as one batch, stitch the windows' labels into a class mask and
an instance mask at the image's size, measure, encode. `Engine.segment` and `Engine.segment_many` are
plain blocking functions. The folder command calls them in process; the service calls them on worker
threads with `infer` routed through its batcher, so that concurrent requests share model runs. Nothing
here knows about HTTP.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from app.engine.augment import augmented
from app.engine.cells import Cell, Infer, Stitcher, measure_cells, primary_cell, segment_cells
from app.engine.contract import ModelMetadata
from app.engine.errors import ClientGoneError, ImageTooLargeError, ServiceError, TooManyCellsError
from app.engine.geometry import geojson_document
from app.engine.imaging import (
    DecodeLimits,
    check_image,
    decode_image,
    encode_instances_png,
    encode_mask_png,
    encode_overlay_png,
)
from app.engine.measure import Measurements, measure
from app.engine.pixel_size import pixel_size_from_file
from app.engine.session import Model, ModelConfig
from app.engine.transform import InputTransform


@dataclass(frozen=True)
class Options:
    """What to produce for each image."""

    pixel_size_um: float | None = None
    mask_png: bool = False
    overlay_png: bool = False
    instances_png: bool = False
    geojson: bool = False
    cell_diameter_px: float | None = None
    arrays: bool = False  # keep the class and instance masks as arrays (callers that want pixels)


@dataclass(frozen=True)
class Result:
    """A segmented image: its measurements and the encoded outputs that were asked for."""

    filename: str
    measurements: Measurements
    inference_ms: float
    model: dict[str, str]
    cells: list[Cell]
    primary_cell_id: int | None
    pixel_size_um: float | None
    pixel_size_source: str | None  # "request", "file" or None
    mask_png: bytes | None = None
    overlay_png: bytes | None = None
    instances_png: bytes | None = None
    geojson: dict[str, Any] | None = None
    labels: np.ndarray | None = None  # (H, W) uint8 class ids, with `Options.arrays`
    instances: np.ndarray | None = None  # (H, W) uint16 cell ids, with `Options.arrays`


@dataclass(frozen=True)
class Failure:
    """A file that could not be processed, and why."""

    filename: str
    error: ServiceError


@dataclass(frozen=True)
class Decoded:
    """A decoded image `(H, W, 3)` uint8 and the pixel size its file records."""

    pixels: np.ndarray
    file_pixel_size_um: float | None


@dataclass(frozen=True)
class Upload:
    """A file to segment; `error` is set when it was refused before it reached the engine (too large);
    `decoded` when it was decoded elsewhere (`decode_upload`, say on a Ray CPU task), and `data` is then
    not read."""

    filename: str
    data: bytes
    error: ServiceError | None = None
    decoded: Decoded | None = None


def decode_upload(upload: Upload, limits: DecodeLimits, file_pixel_size: bool = True) -> Decoded:
    """Decode the file (its header checked against `limits` first, by `decode_image`) and read its
    recorded pixel size.

    Raises:
        ServiceError: the file was refused or cannot be decoded (`InvalidImageError`, ...).
    """
    if upload.decoded is not None:
        return upload.decoded
    if upload.error is not None:
        raise upload.error
    # The decoded Pillow image is dropped as soon as its array exists: both would cost 7 bytes a pixel.
    pixels = np.asarray(decode_image(upload.data, limits))
    return Decoded(pixels, pixel_size_from_file(upload.data) if file_pixel_size else None)


class CellBudget:
    """The leukocyte candidates (each a model run) left to one request, drawn by its files as each is
    reached, from any thread."""

    def __init__(self, cells: int) -> None:
        self.left = cells
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        """Draw `count` candidates.

        Raises:
            TooManyCellsError: fewer are left; nothing is drawn.
        """
        with self._lock:
            if count > self.left:
                raise TooManyCellsError(
                    f"The files of this request hold more leukocyte candidates than the limit of one request;"
                    f" this image's {count} are over what is left ({self.left}). Send fewer files at once.")
            self.left -= count


def _checked(infer: Infer, cancelled: Callable[[], bool] | None) -> Infer:
    """`infer`, refusing to start a run for a client that has gone."""
    if cancelled is None:
        return infer

    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        if cancelled():
            raise ClientGoneError("The client has gone.")
        return infer(images)

    return run


class Engine:
    """Decode → find cells → infer their windows → stitch → measure → encode, for one model.

    Args:
        model: the loaded model.
        limits: what a file may ask of the decoder (`DecodeLimits`), or only its largest pixel count.
        max_batch_pixels: most pixels of all the files of one request (`within_pixel_budget`).
        max_cells: most leukocyte candidates of one image; an image with more is a `Failure` (413)
            before any model run. None: no limit.
        max_batch_cells: most leukocyte candidates of all the files of one request (`cell_budget`).
    """

    def __init__(self, model: Model, limits: DecodeLimits | int, max_batch_pixels: int | None = None,
                 max_cells: int | None = None, max_batch_cells: int | None = None) -> None:
        self.model = model
        self.limits = limits if isinstance(limits, DecodeLimits) else DecodeLimits(max_pixels=limits)
        self.max_batch_pixels = max_batch_pixels
        self.max_cells = max_cells
        self.max_batch_cells = max_batch_cells
        self.transform = InputTransform.from_metadata(model.metadata)

    @classmethod
    def open(cls, config: ModelConfig, limits: DecodeLimits | int, max_batch_pixels: int | None = None,
             max_cells: int | None = None, max_batch_cells: int | None = None) -> Engine:
        """Load the model (see `Model.open`)."""
        return cls(Model.open(config), limits, max_batch_pixels, max_cells, max_batch_cells)

    @property
    def metadata(self) -> ModelMetadata:
        """The served model's metadata."""
        return self.model.metadata

    @property
    def model_ref(self) -> dict[str, str]:
        """`{"name", "version", "tta"}` of every result: the version names the precision (`+int8`), and
        the test-time augmentation changes the masks, so both travel with each result."""
        return {**self.metadata.ref, "tta": self.model.tta}

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """The model run in this thread (see `Infer`)."""
        started = time.perf_counter()
        logits = self.model.run(images)
        return logits, (time.perf_counter() - started) * 1000.0

    def segment(self, upload: Upload, options: Options, infer: Infer | None = None,
                cancelled: Callable[[], bool] | None = None) -> Result | Failure:
        """Segment one file; a file that cannot be decoded becomes a `Failure`.

        Args:
            upload: the file.
            options: what to produce.
            infer: how to run the model (default: `self.infer`, in this thread).
            cancelled: asked at each stage boundary; when it says True, the work stops there.

        Raises:
            ClientGoneError: `cancelled()` said True.
            Whatever `infer` raises (the service's batcher: overloaded, shutting down).
        """
        return self.segment_many([upload], options, infer, cancelled)[0]

    def segment_many(self, uploads: Sequence[Upload], options: Options, infer: Infer | None = None,
                     cancelled: Callable[[], bool] | None = None,
                     cells: CellBudget | None = None) -> list[Result | Failure]:
        """Segment files in upload order; a file that fails becomes a `Failure` in its place and never
        stops the others (see `segment` for the arguments; `cells`: the request's `cell_budget`, shared
        by every call that segments part of its files)."""
        checked = augmented(_checked(infer or self.infer, cancelled), self.model.tta)
        return [self._segment_one(upload, options, checked, cancelled, cells) for upload in uploads]

    def cell_budget(self) -> CellBudget | None:
        """The leukocyte candidates all the files of one request may have together (`max_batch_cells`)."""
        return None if self.max_batch_cells is None else CellBudget(self.max_batch_cells)

    def within_pixel_budget(self, uploads: Sequence[Upload]) -> list[Upload]:
        """The uploads of one request, those past `max_batch_pixels` (counted from their headers, in
        upload order) refused with 413; the files before them keep their results. Done once per
        request before its files are shared out, so that every share draws on one budget."""
        left = self.max_batch_pixels
        if left is None or len(uploads) < 2:
            return list(uploads)
        kept = []
        for upload in uploads:
            if upload.error is None and upload.decoded is None:
                try:
                    width, height = check_image(upload.data, self.limits)
                except ServiceError as exc:
                    upload = replace(upload, error=exc)
                else:
                    if width * height > left:
                        upload = replace(upload, error=ImageTooLargeError(
                            f"The files of this request hold more pixels than the limit of one request; "
                            f"this {width}×{height} image is over what is left ({left})."))
                    else:
                        left -= width * height
            kept.append(upload)
        return kept

    def _segment_one(self, upload: Upload, options: Options, infer: Infer,
                     cancelled: Callable[[], bool] | None, cells: CellBudget | None) -> Result | Failure:
        if cancelled is not None and cancelled():
            raise ClientGoneError("The client has gone.")
        try:
            decoded = decode_upload(upload, self.limits, file_pixel_size=not options.pixel_size_um)
        except ServiceError as exc:
            return Failure(upload.filename, exc)
        try:
            stitched, run_ms = segment_cells(decoded.pixels, self.transform, infer, options.cell_diameter_px,
                                             functools.partial(self._admit, cells))
        except TooManyCellsError as exc:
            return Failure(upload.filename, exc)
        return self._finish(upload.filename, decoded, stitched, run_ms, options)

    def _admit(self, cells: CellBudget | None, count: int) -> None:
        if self.max_cells is not None and count > self.max_cells:
            raise TooManyCellsError(f"The image holds {count} leukocyte candidates, more than the limit of "
                                    f"{self.max_cells} per image; send it in smaller tiles.")
        if cells is not None:
            cells.take(count)

    def _finish(self, filename: str, decoded: Decoded, stitched: Stitcher, run_ms: float,
                options: Options) -> Result:
        pixel_size, source = ((options.pixel_size_um, "request") if options.pixel_size_um else
                              (decoded.file_pixel_size_um, "file") if decoded.file_pixel_size_um else
                              (None, None))
        cells = measure_cells(stitched, pixel_size)
        return Result(
            filename, measure(stitched.labels, pixel_size), run_ms, self.model_ref, cells,
            primary_cell(cells, stitched.instances), pixel_size, source,
            mask_png=encode_mask_png(stitched.labels) if options.mask_png else None,
            overlay_png=(encode_overlay_png(decoded.pixels, stitched.labels, stitched.instances,
                                            [(c.id, c.centroid) for c in cells])
                         if options.overlay_png else None),
            instances_png=encode_instances_png(stitched.instances) if options.instances_png else None,
            geojson=geojson_document(cells, stitched.instances, stitched.labels) if options.geojson else None,
            labels=stitched.labels if options.arrays else None,
            instances=stitched.instances if options.arrays else None)
