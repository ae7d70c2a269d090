"""Structured logs and per-request metrics: request ids, sizes, statuses and latencies, never content."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.metrics import Metrics
from app.api.server import return_freed_memory
from app.engine.report import printable

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RECORD_FIELDS = ("method", "path", "route", "status", "latency_ms", "request_bytes", "response_bytes")
_QUIET_ROUTES = ("/health/live", "/health/ready", "/metrics")
#: A request that took this long gets the memory it freed given back once answered (`return_freed_memory`:
#: about 0.5 ms after a crop, up to about 100 ms after a gigabyte was freed; a crop's 35 ms request frees
#: too little to need it).
TRIM_AFTER_S = 0.1


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and request fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            entry["request_id"] = rid
        entry.update({key: getattr(record, key) for key in _RECORD_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class EscapingFormatter(logging.Formatter):
    """Plain text, one line per record: control characters of the message (a `%0A` decoded into a
    request path, terminal escape sequences) are written as escapes, so no client forges a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def configure_logging(level: str, fmt: str) -> None:
    """Send the `app` loggers to stderr as JSON (or plain text), replacing an earlier set-up."""
    log = logging.getLogger("app")
    for handler in [h for h in log.handlers if getattr(h, "_wbc", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._wbc = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def route_template(scope: Scope) -> str:
    """The path template of the route that served `scope` (bounded metric labels), or `unmatched`.

    Read after the request: the router records the route it chose in the scope.
    """
    return str(getattr(scope.get("route"), "path", None) or "unmatched")


class RequestContextMiddleware:
    """Gives every request an id (`X-Request-ID`, kept when the client sends a sane one), then logs and
    counts it: method, route, status, latency and body sizes; after a long one, gives the memory it freed
    back to the system."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        rid = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id.set(rid)
        method = scope["method"]
        sizes = {"request": 0, "response": 0}
        status = 500
        started = time.perf_counter()

        async def counted_receive() -> Message:
            message = await receive()
            sizes["request"] += len(message.get("body", b""))
            return message

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            elif message["type"] == "http.response.body":
                sizes["response"] += len(message.get("body", b""))
            await send(message)

        in_progress = self.metrics.in_progress.labels(method)
        in_progress.inc()
        try:
            await self.app(scope, counted_receive, tagged_send)
        finally:
            in_progress.dec()
            elapsed = time.perf_counter() - started
            self._record(rid, method, scope["path"], route_template(scope), status, elapsed, sizes)
            request_id.reset(token)
        if elapsed >= TRIM_AFTER_S:  # answered: what the request held is freed
            await anyio.to_thread.run_sync(return_freed_memory)

    def _record(self, rid: str, method: str, path: str, route: str, status: int, elapsed: float,
                sizes: dict[str, int]) -> None:
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route, str(status)).observe(elapsed)
        level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
        logger.log(level, "%s %s %d", method, path, status, extra={
            "request_id": rid, "method": method, "path": path, "route": route, "status": status,
            "latency_ms": round(elapsed * 1000, 2), "request_bytes": sizes["request"],
            "response_bytes": sizes["response"]})
