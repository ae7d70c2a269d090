"""Request guards that act before the body is read: the API key and the request size limit."""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTooLargeError, service_error_response
from app.engine.errors import PayloadTooLargeError, UnauthorizedError

API_KEY_HEADER = "X-API-Key"

#: Declares the key in the OpenAPI schema (and the docs' Authorize button); the check is the middleware's.
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="The service's API key, when one is configured.")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class ApiKeyMiddleware:
    """Refuses requests under `prefixes` without the right `X-API-Key` (compared in constant time).

    Runs before routing so that an unauthenticated client cannot make the service read an upload.
    """

    def __init__(self, app: ASGIApp, api_key: str, prefixes: tuple[str, ...] = ("/v1/",)) -> None:
        self.app = app
        self._digest = _digest(api_key)
        self._prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith(self._prefixes)
                and scope["method"] != "OPTIONS" and not self._authorised(scope)):
            response = service_error_response(UnauthorizedError(
                f"A valid {API_KEY_HEADER} header is required.", headers={"WWW-Authenticate": "ApiKey"}))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        given = Headers(scope=scope).get(API_KEY_HEADER)
        # Hashing first makes the comparison independent of the key's length as well.
        return given is not None and hmac.compare_digest(_digest(given), self._digest)


class BodyLimitMiddleware:
    """Answers 413 when a request body is larger than `max_bytes`: from `Content-Length` before reading
    anything, or while reading a body sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await service_error_response(PayloadTooLargeError(self._detail()))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLargeError(self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"The request body is larger than the limit of {self.max_bytes} bytes."
