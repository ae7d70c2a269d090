"""Segmentation of one image or a batch of images."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, Response, UploadFile

from app.errors import PayloadTooLargeError, TooManyFilesError
from app.pipeline import Options, Outcome, Pipeline, Upload
from app.report import batch_document, batch_zip, client_filename, result_document, safe_stem
from app.routes import problems
from app.schemas import BatchResult, SegmentResult
from app.state import PipelineDep, StateDep

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


@router.post(
    "/v1/segment", response_model=SegmentResult, summary="Segment one image",
    responses={200: {"description": "JSON measurements, the label mask PNG, or an overlay PNG",
                     "content": {"image/png": _BINARY}, "headers": _AREA_HEADERS},
               **problems(400, 413, 415, 422, 503)},
)
async def segment_image(
    pipeline: PipelineDep,
    state: StateDep,
    file: Annotated[UploadFile, File(description="A PNG, JPEG, BMP or TIFF image")],
    output: Annotated[Literal["json", "png", "overlay"], Query(
        alias="format", description="json: measurements; png: label mask (class ids); overlay: for people")
    ] = "json",
    include_mask: IncludeMask = False,
    pixel_size_um: PixelSize = None,
) -> Response:
    """Nucleus and cytoplasm of one white blood cell image: measurements, mask or overlay."""
    upload = await read_upload(file, state.settings.max_file_bytes)
    if upload.error is not None:
        raise upload.error
    options = Options(pixel_size_um, mask_png=output == "png" or include_mask,
                      overlay_png=output == "overlay")
    outcome = await pipeline.segment(upload, options)
    headers = area_headers(outcome)
    if output == "json":
        ref = model_ref(pipeline)
        body = await render(pipeline, lambda: result_document(outcome, ref, include_mask), include_mask)
        return Response(body, media_type="application/json", headers=headers)
    suffix = "mask" if output == "png" else "overlay"
    headers["Content-Disposition"] = f'inline; filename="{safe_stem(upload.filename)}_{suffix}.png"'
    content = outcome.mask_png if output == "png" else outcome.overlay_png
    return Response(content, media_type="image/png", headers=headers)


@router.post(
    "/v1/segment/batch", response_model=BatchResult, summary="Segment many images",
    responses={200: {"description": "Per-file results in upload order, as JSON or a ZIP",
                     "content": {"application/zip": _BINARY}},
               **problems(400, 413, 422, 503)},
)
async def segment_batch(
    pipeline: PipelineDep,
    state: StateDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="PNG, JPEG, BMP or TIFF images")],
    output: Annotated[Literal["json", "zip"], Query(
        alias="format", description="json: per-file results; zip: masks, results.csv and results.json")
    ] = "json",
    include_mask: IncludeMask = False,
    pixel_size_um: PixelSize = None,
    overlay: Annotated[bool, Query(description="With format=zip: add <stem>_overlay.png per image")] = False,
) -> Response:
    """Segment every file; one that cannot be processed becomes an error item and the others go on."""
    limit = state.settings.max_files
    if len(files) > limit:
        raise TooManyFilesError(f"The batch has {len(files)} files; the limit is {limit}.")
    uploads = [await read_upload(f, state.settings.max_file_bytes) for f in files]
    as_zip = output == "zip"
    options = Options(pixel_size_um, mask_png=as_zip or include_mask, overlay_png=as_zip and overlay)
    items = await pipeline.segment_batch(uploads, options)
    if not as_zip:
        ref = model_ref(pipeline)
        body = await render(pipeline, lambda: batch_document(items, ref, include_mask), include_mask)
        return Response(body, media_type="application/json")
    document = batch_document(items, model_ref(pipeline), include_mask=False)
    archive = await pipeline.run_blocking(batch_zip, items, document, overlay)
    return Response(archive, media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="segmentation.zip"'})


async def read_upload(file: UploadFile, max_bytes: int) -> Upload:
    """The file's name and bytes; a file over `max_bytes` is refused without reading it."""
    name = client_filename(file.filename)
    too_large = PayloadTooLargeError(f"The file is larger than the limit of {max_bytes} bytes.")
    if file.size is not None and file.size > max_bytes:
        return Upload(name, b"", too_large)
    data = await file.read()
    return Upload(name, b"", too_large) if len(data) > max_bytes else Upload(name, data)


async def render(pipeline: Pipeline, build: Callable[[], dict[str, Any]], heavy: bool) -> str:
    """The JSON text of `build()`; on a worker thread when `heavy` (masks embedded as base64 PNGs)."""
    if heavy:
        return await pipeline.run_blocking(lambda: json.dumps(build(), allow_nan=False))
    return json.dumps(build(), allow_nan=False)


def area_headers(outcome: Outcome) -> dict[str, str]:
    """`X-Area-Nucleus-Px`, `X-Area-Cytoplasm-Px` and `X-Area-Cell-Px`."""
    areas = outcome.measurements.areas_px
    return {f"X-Area-{name.capitalize()}-Px": str(areas[name]) for name in ("nucleus", "cytoplasm", "cell")}


def model_ref(pipeline: Pipeline) -> dict[str, str]:
    """Name and version of the model that produced the results."""
    meta = pipeline.segmenter.metadata
    return {"name": meta.name, "version": meta.version}
