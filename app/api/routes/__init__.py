"""HTTP routes, one router per concern; `problems` documents their error responses."""

from __future__ import annotations

from typing import Any

from app.api.schemas import Problem

_DESCRIPTIONS = {
    400: "The multipart body cannot be parsed.",
    401: "The X-API-Key header is missing or wrong.",
    413: "The request, a file or an image is over the configured limits, or a batch has too many files.",
    415: "The file is not a PNG, JPEG, BMP or TIFF image.",
    422: "The image is corrupt or empty, or a parameter is invalid.",
    503: "The model is not loaded, the service is shutting down, or the inference queue is full.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"}}}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each an `application/problem+json` `Problem`."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        responses[code] = {"model": Problem, "description": _DESCRIPTIONS[code]}
        if code == 503:
            responses[code]["headers"] = _RETRY_AFTER
    return responses
