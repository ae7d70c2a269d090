"""The one place that turns the engine's domain errors (and FastAPI's own) into `application/problem+json`."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import PayloadTooLargeError, ServiceError, TooManyFilesError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:wbc-segmenter:problem:"
#: How Starlette's multipart parser words a form past its `max_files` (its 400's detail).
_PARSER_TOO_MANY_FILES = "Too many files."


class BodyTooLargeError(StarletteHTTPException):
    """The request body outgrew its limit while being read.

    An HTTP exception, not a `ServiceError`, because it is raised inside the ASGI receive channel,
    where FastAPI's body parser lets only HTTP exceptions through.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BodyTimeoutError(StarletteHTTPException):
    """A chunk of the request body did not arrive in time (raised in the receive channel, as above)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


def problem_body(status: int, title: str, detail: str, slug: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem document; `about:blank` when the status says it all."""
    kind = PROBLEM_TYPE_BASE + slug if slug else "about:blank"
    return {"type": kind, "title": title, "status": status, "detail": detail}


def problem_response(status: int, title: str, detail: str, slug: str | None = None,
                     headers: dict[str, str] | None = None) -> JSONResponse:
    """A `JSONResponse` carrying a problem document with the problem media type."""
    return JSONResponse(problem_body(status, title, detail, slug), status_code=status,
                        media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    """The problem response for a domain error."""
    return problem_response(exc.status, exc.title, exc.detail, exc.slug, exc.headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, BodyTooLargeError):
        return service_error_response(PayloadTooLargeError(str(exc.detail)))
    if exc.status_code == 400 and str(exc.detail).startswith(_PARSER_TOO_MANY_FILES):
        # The batch limit, enforced by the multipart parser (`form_limits` = `max_files`, main.py): a 413
        # like every other size limit, not the parser's 400.
        limit = request.app.state.service.settings.max_files
        return service_error_response(TooManyFilesError(
            f"The request has more than {limit} files; the limit is {limit} per request."))
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else _default_detail(exc)
    return problem_response(exc.status_code, phrase, detail, headers=dict(exc.headers or {}))


def _default_detail(exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return "No such resource."
    if exc.status_code == 405:
        return "This method is not allowed on this resource."
    return HTTPStatus(exc.status_code).description or HTTPStatus(exc.status_code).phrase


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only where and what: the offending input may be an upload and never goes back to the client.
    errors = [{"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
              for err in exc.errors()]
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "Invalid request."
    body = {**problem_body(422, "Invalid request", detail, "invalid-request"), "errors": errors}
    return JSONResponse(body, status_code=422, media_type=PROBLEM_MEDIA_TYPE)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "Internal error", "The server could not process this request.",
                            "internal-error")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error, FastAPI's own included, to a problem response."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    _install_problem_openapi(app)


def _install_problem_openapi(app: FastAPI) -> None:
    """Document error responses as `application/problem+json` instead of FastAPI's `application/json`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    _retype_error_responses(operation.get("responses", {}))
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _retype_error_responses(responses: dict[str, Any]) -> None:
    for code, response in responses.items():
        content = response.get("content", {})
        if code[:1] in "45" and "application/json" in content:
            content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
