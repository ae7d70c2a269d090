"""KServe Open Inference Protocol v2, the REST contract of KServe and Triton, in front of the engine.

Spec: https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
Binary tensors (Triton's extension, tritonclient's default): https://github.com/triton-inference-server/
server/blob/main/docs/protocol/extension_binary_data.md

The model of this protocol is the whole pipeline, not the network: the encoded file goes in, the
engine's results come out, exactly as `/v1/segment` computes them.

- input `image` UINT8 `[n]`: the file's bytes (PNG, JPEG, BMP or TIFF), JSON `data` a flat list of ints
  or binary (`Inference-Header-Content-Length`); request `parameters` `pixel_size_um`, `cell_diameter_px`.
- output `labels` UINT8 `[H, W]`: class ids (0 background, 1 cytoplasm, 2 nucleus), `format=png`'s pixels.
- output `instances` UINT16 `[H, W]`: cell ids, 0 outside cells, `format=instances`'s pixels.
- output `cells` BYTES `[n]`: one UTF-8 JSON document per cell, the items of the JSON `cells`. BYTES
  rather than an FP32 table: the documents keep their ints, nulls and nested areas, and tritonclient's
  `as_numpy` returns them in both JSON and binary mode.
- output `summary` BYTES `[1]`: the rest of `/v1/segment`'s JSON (areas, fractions, N:C, pixel size).

Errors are `application/problem+json` with an `error` member too, the field OIP clients read.
No `/versions/<v>` paths: the one version served is listed in the model's metadata.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.deps import RuntimeDep, SettingsDep, StateDep
from app.api.errors import PROBLEM_MEDIA_TYPE
from app.api.routes import health, problems
from app.api.routes.segment import CellDiameter, PixelSize, run_engine
from app.api.schemas import Problem
from app.engine import Failure, ModelMetadata, Options, Result, Upload
from app.engine.errors import PayloadTooLargeError, ServiceError
from app.engine.report import cell_document, result_document

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Most bytes of a request's JSON part. A JSON `data` list costs the parser about 40 bytes of memory per
#: listed byte (a 90 MB list of zeros took +1.8 GB, docs/reliability.md), so an image over about 1 MB
#: travels as a binary tensor (`binary_data_size`, tritonclient's default).
MAX_JSON_BYTES = 4 << 20
_BYTE_COUNT = re.compile(r"[0-9]{1,18}")
INPUT = "image"
PLATFORM = "wbc-segmenter pipeline (onnxruntime)"


class TensorMetadata(BaseModel):
    """A tensor of the model's metadata; -1 is a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


OUTPUTS = (TensorMetadata(name="labels", datatype="UINT8", shape=[-1, -1]),
           TensorMetadata(name="instances", datatype="UINT16", shape=[-1, -1]),
           TensorMetadata(name="cells", datatype="BYTES", shape=[-1]),
           TensorMetadata(name="summary", datatype="BYTES", shape=[1]))
_DTYPES = {"labels": "<u1", "instances": "<u2"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class InferParameters(_Strict):
    """Request parameters: those of `/v1/segment`, and the binary extension's `binary_data_output`."""

    pixel_size_um: PixelSize = None
    cell_diameter_px: CellDiameter = None
    binary_data_output: bool = False


class RequestInput(_Strict):
    name: str
    shape: list[int] = Field(description="[n_bytes]")
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = Field(None, description="The file's bytes as a flat list of ints; absent when binary")


class RequestOutput(_Strict):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Strict):
    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OipProblem(Problem):
    error: str = Field(description="The detail again, where OIP clients (tritonclient) look for it")


class MalformedRequestError(ServiceError):
    """The body is not an inference request: not JSON, or its binary parts do not add up."""

    status, slug, title = 400, "malformed-request", "Bad request"


class UnknownModelError(ServiceError):
    status, slug, title = 404, "unknown-model", "Not found"


class _OipRoute(APIRoute):
    """Answers errors with the app's problem documents plus the `error` member of the protocol."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_error_member(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                handler = next((request.app.exception_handlers[kind] for kind in type(exc).__mro__
                                if kind in request.app.exception_handlers), None)
                if handler is None:
                    raise
                answer = await handler(request, exc)
                body = json.loads(answer.body)
                body["error"] = body.get("detail", "")
                headers = {k: v for k, v in answer.headers.items()
                           if k not in ("content-length", "content-type")}
                return JSONResponse(body, answer.status_code, headers, media_type=PROBLEM_MEDIA_TYPE)

        return handle_with_error_member


router = APIRouter(tags=["open inference protocol"], route_class=_OipRoute)


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    own = {400: "The body is not an inference request (JSON, then the binary tensors it announces).",
           404: "No model of this name is served."}
    return {code: ({"model": OipProblem, "description": own[code]} if code in own
                   else {**problems(code)[code], "model": OipProblem}) for code in codes}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with its `$defs` references replaced by the definitions (for an inline request body)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    return [_inline(v, defs) for v in schema] if isinstance(schema, list) else schema


_REQUEST_SCHEMA = InferenceRequest.model_json_schema()
_REQUEST_BODY = {"required": True, "description": f"JSON, or JSON followed by the binary tensors with "
                 f"`{HEADER_LENGTH}` giving the JSON's length", "content": {
                     "application/json": {"schema": _inline(_REQUEST_SCHEMA, _REQUEST_SCHEMA["$defs"])}}}


ModelName = Annotated[str, Path(max_length=256, description="The model's name, as GET /v1/model gives it")]


def _model(meta: ModelMetadata, name: str) -> ModelMetadata:
    """`meta` when `name` is its model's name; otherwise a 404 naming the model served."""
    if name != meta.name:
        raise UnknownModelError(f"No model named {name!r} is served; GET /v2/models/{meta.name}.")
    return meta


@router.get("/v2/health/live", summary="OIP server live")
async def server_live() -> dict[str, bool]:
    """200 as long as the process runs (`/health/live`)."""
    return {"live": True}


@router.get("/v2/health/ready", responses=_problems(503), summary="OIP server ready")
async def server_ready(state: StateDep) -> dict[str, bool]:
    """200 once the model is loaded and warmed up, 503 otherwise (`/health/ready`)."""
    await health.ready(state)
    return {"ready": True}


@router.get("/v2", response_model=ServerMetadata, summary="OIP server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    """The service's name, version and protocol extensions."""
    return ServerMetadata(name="wbc-segmenter", version=request.app.version,
                          extensions=["binary_tensor_data"])


@router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=_problems(404, 422, 503),
            summary="OIP model metadata")
async def model_metadata(name: ModelName, state: StateDep) -> ModelMetadataResponse:
    """The pipeline's input and outputs (see this module's docstring)."""
    meta = _model(state.require_runtime().engine.metadata, name)
    return ModelMetadataResponse(name=meta.name, versions=[meta.version], platform=PLATFORM,
                                 inputs=[TensorMetadata(name=INPUT, datatype="UINT8", shape=[-1])],
                                 outputs=list(OUTPUTS))


@router.get("/v2/models/{name}/ready", responses=_problems(404, 422, 503), summary="OIP model ready")
async def model_ready(name: ModelName, state: StateDep) -> dict[str, Any]:
    """200 when the service is ready and `name` is its model; 503 while not ready."""
    await health.ready(state)
    return {"name": _model(state.require_runtime().engine.metadata, name).name, "ready": True}


@router.post(
    "/v2/models/{name}/infer", response_class=Response, summary="OIP inference: segment one image",
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={200: {"model": InferenceResponse, "description": f"JSON, or JSON + binary tensors with "
                     f"`{HEADER_LENGTH}`", "content": {"application/octet-stream": {}}},
               **_problems(400, 404, 413, 415, 422, 503)})
async def infer(name: ModelName, request: Request, runtime: RuntimeDep, settings: SettingsDep) -> Response:
    """Segment the image file of input `image` (exactly as `/v1/segment`) and return the outputs asked for."""
    meta = _model(runtime.engine.metadata, name)
    header_length = request.headers.get(HEADER_LENGTH)
    announced = byte_count(request.headers.get("content-length") if header_length is None else header_length)
    if announced is not None:
        _check_json_length(announced)  # before the body is read (a chunked body is checked once read)
    body = await request.body()
    call = await anyio.to_thread.run_sync(parse_request, body, header_length, settings.max_file_bytes,
                                          limiter=runtime.limiter)
    result = await run_engine(runtime, request, call.upload, call.options)
    if isinstance(result, Failure):
        raise result.error
    header, parts = await anyio.to_thread.run_sync(encode_response, result, call, meta,
                                                   limiter=runtime.limiter)
    if not parts:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(parts), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


@dataclass(frozen=True)
class InferCall:
    """A parsed request: the file, what to compute, and which outputs to return, each binary or not."""

    request_id: str | None
    upload: Upload
    options: Options
    outputs: dict[str, bool]


def _invalid(loc: tuple[str | int, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg}])


def parse_request(body: bytes, header_length: str | None, max_file_bytes: int) -> InferCall:
    """The `InferCall` of a request body (JSON, then binary tensors when `header_length` is given).

    Raises:
        MalformedRequestError: (400) not JSON, or binary parts that do not add up.
        RequestValidationError: (422) a well-formed request this model cannot take.
        PayloadTooLargeError: (413) a file over `max_file_bytes`, a JSON part over `MAX_JSON_BYTES`.
    """
    length = len(body) if header_length is None else byte_count(header_length)
    if length is None or not 0 <= length <= len(body):
        raise MalformedRequestError(f"{HEADER_LENGTH} must be a byte count within the body.")
    _check_json_length(length)
    try:
        request = InferenceRequest.model_validate_json(body[:length])
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise MalformedRequestError("The body (or its JSON part) is not valid JSON.") from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    data = _input_bytes(request, body[length:], max_file_bytes)
    params = request.parameters or InferParameters()
    outputs = _requested_outputs(request, params.binary_data_output)
    options = Options(params.pixel_size_um, cell_diameter_px=params.cell_diameter_px,
                      arrays="labels" in outputs or "instances" in outputs)
    return InferCall(request.id, Upload("image", data), options, outputs)


def byte_count(text: str | None) -> int | None:
    """A header's byte count: ASCII digits only, at most 18 of them; None for anything else."""
    return int(text) if text is not None and _BYTE_COUNT.fullmatch(text) else None


def _check_json_length(length: int) -> None:
    """Refuse a JSON part longer than `MAX_JSON_BYTES`."""
    if length > MAX_JSON_BYTES:
        raise PayloadTooLargeError(
            f"The JSON part of the request is {length} bytes, over the limit of {MAX_JSON_BYTES}; send the "
            f"image as a binary tensor ({HEADER_LENGTH} and the input's binary_data_size).")


def _input_bytes(request: InferenceRequest, binary: bytes, max_file_bytes: int) -> bytes:
    """The file of input `image`, from its JSON data or its part of the binary tail."""
    offset, found = 0, None
    for index, tensor in enumerate(request.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None and (type(size) is not int or size < 0 or offset + size > len(binary)):
            raise MalformedRequestError(f"Input {tensor.name!r}: binary_data_size must be a byte count "
                                        "within the binary part of the body.")
        if tensor.name != INPUT or found is not None:
            raise _invalid(("inputs", index, "name"), f"the model's one input is {INPUT!r}")
        if tensor.datatype != "UINT8" or len(tensor.shape) != 1:
            raise _invalid(("inputs", index), "the image is a UINT8 tensor of shape [n_bytes]")
        if tensor.shape[0] > max_file_bytes:
            raise PayloadTooLargeError(f"The file is larger than the limit of {max_file_bytes} bytes.")
        found = binary[offset:offset + size] if size is not None else _json_bytes(tensor.data, index)
        offset += size or 0
        if len(found) != tensor.shape[0]:
            raise _invalid(("inputs", index, "shape"), f"the data holds {len(found)} bytes")
    if offset != len(binary):
        raise MalformedRequestError("The binary part of the body is longer than its tensors announce.")
    if found is None:
        raise _invalid(("inputs",), f"input {INPUT!r} is missing")
    return found


def _json_bytes(data: Any, index: int) -> bytes:
    try:
        if not isinstance(data, list):
            raise TypeError
        return bytes(data)  # refuses floats, strings and ints outside 0-255 at C speed
    except (TypeError, ValueError):
        raise _invalid(("inputs", index, "data"), "the file's bytes as a flat list of ints from 0 to 255"
                       ) from None


def _requested_outputs(request: InferenceRequest, binary_default: bool) -> dict[str, bool]:
    """Output name → sent as binary, in the order asked for (every output when none is named)."""
    if request.outputs is None:
        return {output.name: binary_default for output in OUTPUTS}
    known = {output.name for output in OUTPUTS}
    chosen = {}
    for index, output in enumerate(request.outputs):
        if output.name not in known:
            raise _invalid(("outputs", index, "name"), f"the outputs are {', '.join(sorted(known))}")
        binary = (output.parameters or {}).get("binary_data", binary_default)
        chosen[output.name] = binary is True
    return chosen


def encode_response(result: Result, call: InferCall, meta: ModelMetadata) -> tuple[bytes, list[bytes]]:
    """The response's JSON and, in the same order, the binary tensors it announces."""
    outputs, parts = [], []
    for name, binary in call.outputs.items():
        values = _output_values(result, name)
        shape = list(values.shape) if isinstance(values, np.ndarray) else [len(values)]
        datatype = next(o.datatype for o in OUTPUTS if o.name == name)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            parts.append(_binary(values))
            output["parameters"] = {"binary_data_size": len(parts[-1])}
        else:
            output["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        outputs.append(output)
    document: dict[str, Any] = {"model_name": meta.name, "model_version": meta.version, "outputs": outputs}
    if call.request_id is not None:
        document["id"] = call.request_id
    return json.dumps(document, allow_nan=False).encode(), parts


def _output_values(result: Result, name: str) -> np.ndarray | list[str]:
    if name in _DTYPES:
        values = result.labels if name == "labels" else result.instances
        assert values is not None
        return values.astype(_DTYPES[name], copy=False)
    if name == "cells":
        return [json.dumps(cell_document(cell), allow_nan=False) for cell in result.cells]
    summary = {k: v for k, v in result_document(result).items() if k not in ("cells", "filename")}
    return [json.dumps(summary, allow_nan=False)]


def _binary(values: np.ndarray | list[str]) -> bytes:
    """Little-endian, row-major; a BYTES element is its 4-byte length, then its bytes."""
    if isinstance(values, np.ndarray):
        return values.tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in (v.encode() for v in values))
