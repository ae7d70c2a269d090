"""Segmentation of one image or a batch of images."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from app.api.deps import Runtime, RuntimeDep, SettingsDep
from app.api.routes import problems
from app.api.schemas import BatchResult, SegmentResult
from app.engine import Failure, Options, Result, Upload
from app.engine.errors import PayloadTooLargeError
from app.engine.report import batch_document, batch_zip, client_filename, result_document, safe_stem

if sys.version_info < (3, 11):  # anyio installs the backport there
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)
router = APIRouter(tags=["segmentation"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_AREA_HEADERS = {
    f"X-Area-{name.capitalize()}-Px": {"description": f"{name} area in pixels", "schema": {"type": "integer"}}
    for name in ("nucleus", "cytoplasm", "cell")
}

#: Microscopes image at fractions of a micron per pixel; the upper bound keeps every area finite.
MAX_PIXEL_SIZE_UM = 10_000.0
PixelSize = Annotated[float | None, Query(gt=0, le=MAX_PIXEL_SIZE_UM, allow_inf_nan=False,
                                          description="Microns per pixel; adds areas in µm²")]
IncludeMask = Annotated[bool, Query(description="With format=json: add the mask PNG in base64")]
IncludeInstances = Annotated[bool, Query(
    description="With format=json: add the 16-bit instance PNG in base64 (instances_png_base64)")]
CellDiameter = Annotated[float | None, Query(gt=0, le=100_000, allow_inf_nan=False, description=(
    "A leukocyte's diameter in input pixels, a hint like Cellpose's diameter; without it the service "
    "estimates the scale itself"))]
_MEDIA = {"png": "image/png", "overlay": "image/png", "instances": "image/png",
          "geojson": "application/geo+json"}


@router.post(
    "/v1/segment", response_model=SegmentResult, summary="Segment one image",
    responses={200: {"description": "JSON measurements, the label mask PNG, the 16-bit instance PNG, an "
                                    "overlay PNG or QuPath GeoJSON",
                     "content": {"image/png": _BINARY,
                                 "application/geo+json": {"schema": {"type": "object"}}},
                     "headers": _AREA_HEADERS},
               **problems(400, 413, 415, 422, 503)},
)
async def segment_image(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A PNG, JPEG, BMP or TIFF image")],
    output: Annotated[Literal["json", "png", "overlay", "instances", "geojson"], Query(
        alias="format", description="json: measurements; png: label mask (class ids); overlay: for people; "
        "instances: 16-bit PNG of cell ids; geojson: QuPath cell objects")
    ] = "json",
    include_mask: IncludeMask = False,
    include_instances: IncludeInstances = False,
    pixel_size_um: PixelSize = None,
    cell_diameter_px: CellDiameter = None,
) -> Response:
    """Every leukocyte of one image, split into nucleus and cytoplasm: measurements, masks or outlines."""
    upload = await read_upload(file, settings.max_file_bytes)
    if upload.error is not None:
        runtime.metrics.images.labels("rejected").inc()
        raise upload.error
    options = Options(pixel_size_um, mask_png=output == "png" or include_mask,
                      overlay_png=output == "overlay",
                      instances_png=output == "instances" or include_instances,
                      geojson=output == "geojson", cell_diameter_px=cell_diameter_px)
    result = await run_engine(runtime, request, upload, options)
    if isinstance(result, Failure):
        raise result.error
    headers = {**area_headers(result), "X-Cell-Count": str(len(result.cells))}
    if output == "json":
        return json_response(result_document(result, include_mask, include_instances), headers)
    stem = safe_stem(upload.filename)
    if output == "geojson":
        headers["Content-Disposition"] = f'inline; filename="{stem}.geojson"'
        body = json.dumps(result.geojson, allow_nan=False)
        return Response(body, media_type=_MEDIA[output], headers=headers)
    suffix = {"png": "mask", "overlay": "overlay", "instances": "instances"}[output]
    headers["Content-Disposition"] = f'inline; filename="{stem}_{suffix}.png"'
    images = {"png": result.mask_png, "overlay": result.overlay_png, "instances": result.instances_png}
    content = images[output]
    return Response(content, media_type=_MEDIA[output], headers=headers)


@router.post(
    "/v1/segment/batch", response_model=BatchResult, summary="Segment many images",
    responses={200: {"description": "Per-file results in upload order, as JSON or a ZIP",
                     "content": {"application/zip": _BINARY}},
               **problems(400, 413, 422, 503)},
)
async def segment_batch(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="PNG, JPEG, BMP or TIFF images")],
    output: Annotated[Literal["json", "zip"], Query(
        alias="format", description="json: per-file results; zip: masks, results.csv and results.json")
    ] = "json",
    include_mask: IncludeMask = False,
    include_instances: IncludeInstances = False,
    pixel_size_um: PixelSize = None,
    cell_diameter_px: CellDiameter = None,
    overlay: Annotated[bool, Query(description="With format=zip: add <stem>_overlay.png per image")] = False,
) -> Response:
    """Segment every file; one that cannot be processed becomes an error item and the others go on."""
    uploads = [await read_upload(f, settings.max_file_bytes) for f in files]
    as_zip = output == "zip"
    options = Options(pixel_size_um, mask_png=as_zip or include_mask, overlay_png=as_zip and overlay,
                      instances_png=as_zip or include_instances, cell_diameter_px=cell_diameter_px)
    items = await segment_in_parallel(runtime, request, uploads, options)
    if not as_zip:
        return json_response(batch_document(items, include_mask, include_instances))
    archive = await anyio.to_thread.run_sync(batch_zip, items, overlay, limiter=runtime.limiter)
    return Response(archive, media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="segmentation.zip"'})


@contextlib.asynccontextmanager
async def client_watch(request: Request) -> AsyncIterator[threading.Event]:
    """An event set when the client disconnects while the block runs, so that its work stops at the next
    stage boundary (engine work waiting for a thread, queued inference, the next file of a batch)."""
    gone = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    with first_error():
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            try:
                yield gone
            finally:
                group.cancel_scope.cancel()


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Re-raise the first error of an anyio task group as itself: the group wraps whatever its body raises
    (a 503 `OverloadedError` from a full queue, say) in an `ExceptionGroup`, which the problem handlers do
    not know and would turn into a 500."""
    try:
        yield
    except BaseExceptionGroup as errors:
        leaves = list(_leaves(errors))
        for other in leaves[1:]:
            logger.warning("also raised while segmenting: %r", other)
        first = leaves[0]
        first.__suppress_context__ = True
        raise first  # noqa: B904 (the group is the context, suppressed above; the leaf keeps its cause)


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


async def run_engine(runtime: Runtime, request: Request, upload: Upload,
                     options: Options) -> Result | Failure:
    """`Engine.segment` on a worker thread within the runtime's thread limit; refused at once with a 503
    while the inference queue is full, so that an overloaded service spends nothing on decoding; dropped
    at the next stage boundary when the client goes."""
    with runtime.batcher.admitted():
        async with client_watch(request) as gone:
            infer = functools.partial(runtime.batcher.infer, cancelled=gone.is_set)
            result = await anyio.to_thread.run_sync(runtime.engine.segment, upload, options, infer,
                                                    gone.is_set, limiter=runtime.limiter)
    return count_images(runtime, [result])[0]


async def segment_in_parallel(runtime: Runtime, request: Request, uploads: list[Upload],
                              options: Options) -> list[Result | Failure]:
    """`Engine.segment_many` over the batch, its pixel budget drawn once in upload order, split into one
    contiguous share per inference worker so that every worker has runs to do, all shares drawing on one
    cell budget; results in upload order."""
    parts: list[list[Upload]] = []
    done: list[list[Result | Failure]] = []

    cells = runtime.engine.cell_budget()

    async def segment_part(index: int, gone: threading.Event) -> None:
        infer = functools.partial(runtime.batcher.infer, cancelled=gone.is_set)
        done[index] = await anyio.to_thread.run_sync(runtime.engine.segment_many, parts[index],
                                                     options, infer, gone.is_set, cells,
                                                     limiter=runtime.limiter)

    with runtime.batcher.admitted():
        budgeted = await anyio.to_thread.run_sync(runtime.engine.within_pixel_budget, uploads,
                                                  limiter=runtime.limiter)
        share = -(-len(budgeted) // runtime.batcher.workers)
        parts = [budgeted[i:i + share] for i in range(0, len(budgeted), share)]
        done = [[] for _ in parts]
        with first_error():
            async with client_watch(request) as gone, anyio.create_task_group() as group:
                for index in range(len(parts)):
                    group.start_soon(segment_part, index, gone)
    return count_images(runtime, [item for part in done for item in part])


def count_images(runtime: Runtime, items: list[Result | Failure]) -> list[Result | Failure]:
    """Count each segmented and each refused file in the metrics; return them."""
    for item in items:
        runtime.metrics.images.labels("rejected" if isinstance(item, Failure) else "ok").inc()
    return items


async def read_upload(file: UploadFile, max_bytes: int) -> Upload:
    """The file's name and bytes; a file over `max_bytes` is refused without reading it."""
    name = client_filename(file.filename)
    too_large = PayloadTooLargeError(f"The file is larger than the limit of {max_bytes} bytes.")
    if file.size is not None and file.size > max_bytes:
        return Upload(name, b"", too_large)
    data = await file.read()
    return Upload(name, b"", too_large) if len(data) > max_bytes else Upload(name, data)


def json_response(document: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """`document` as JSON text (NaN refused: every number the API returns is finite)."""
    return Response(json.dumps(document, allow_nan=False), media_type="application/json", headers=headers)


def area_headers(result: Result) -> dict[str, str]:
    """`X-Area-Nucleus-Px`, `X-Area-Cytoplasm-Px` and `X-Area-Cell-Px`."""
    areas = result.measurements.areas_px
    return {f"X-Area-{name.capitalize()}-Px": str(areas[name]) for name in ("nucleus", "cytoplasm", "cell")}
