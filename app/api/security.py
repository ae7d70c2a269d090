"""Request guards that act before the body is read: the API key and the request size limit."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTimeoutError, BodyTooLargeError, service_error_response
from app.engine.errors import OverloadedError, PayloadTooLargeError, UnauthorizedError

API_KEY_HEADER = "X-API-Key"

#: Declares the key in the OpenAPI schema (and the docs' Authorize button); the check is the middleware's.
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="The service's API key, when one is configured.")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class ApiKeyMiddleware:
    """Refuses requests under `prefixes` without the right `X-API-Key` (compared in constant time). The
    health probes (`/health/*`, the protocol's `/v2/health/*`) and server metadata stay open, as for
    the load balancers and KServe probes that call them.

    Runs before routing so that an unauthenticated client cannot make the service read an upload.
    """

    def __init__(self, app: ASGIApp, api_key: str,
                 prefixes: tuple[str, ...] = ("/v1/", "/v2/models")) -> None:
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
    """Bounds request bodies: 413 when one is larger than `max_bytes` (from `Content-Length` before
    reading anything, or while reading a body sent without one); 408 when a chunk of it takes longer
    than `chunk_timeout_s` to arrive (a stalled upload, whose spooled part is then dropped); 503 at once
    when `max_uploads` bodies are already being received (so that the spool on disk stays below
    `max_uploads × max_bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, chunk_timeout_s: float = 30.0,
                 max_uploads: int = 1 << 30) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.chunk_timeout_s = chunk_timeout_s
        self.max_uploads = max_uploads
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await service_error_response(PayloadTooLargeError(self._detail()))(scope, receive, send)
            return
        if self.uploads >= self.max_uploads:
            busy = OverloadedError("Too many uploads are being received; retry shortly.",
                                   headers={"Retry-After": "1"})
            await service_error_response(busy)(scope, receive, send)
            return
        self.uploads += 1
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.uploads -= 1

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        done = False

        async def limited_receive() -> Message:
            nonlocal received, done
            if done:  # the body is in; what follows is only the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.chunk_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeoutError(f"No part of the request body arrived for {self.chunk_timeout_s:g} "
                                       "seconds.") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLargeError(self._detail())
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return limited_receive

    def _detail(self) -> str:
        return f"The request body is larger than the limit of {self.max_bytes} bytes."


#: The page's policy: its own scripts, styles and images only (overlays arrive as blob: URLs), no
#: framing, no inline script.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


class SecurityHeadersMiddleware:
    """`X-Content-Type-Options: nosniff` and `Referrer-Policy` on every answer; on the page and its
    assets also the Content-Security-Policy and `X-Frame-Options: DENY`. (FastAPI's `/docs` loads its
    scripts from a CDN and inline, so the page's policy is not applied there.)"""

    def __init__(self, app: ASGIApp, assets_prefix: str = "/static/") -> None:
        self.app = app
        self.assets_prefix = assets_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        page = path == "/" or path.startswith(self.assets_prefix)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                if page:
                    headers["Content-Security-Policy"] = PAGE_CSP
                    headers["X-Frame-Options"] = "DENY"
            await send(message)

        await self.app(scope, receive, send_with_headers)
