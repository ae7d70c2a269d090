"""The HTTP server's own limits, for `python -m app` and the container: uvicorn on h11 with a bounded
header size, a deadline for each request's head, an idle timeout and a connection limit; and memory
that large requests free goes back to the system (`return_freed_memory`).

uvicorn's keep-alive timer only runs between requests, so a connection that sends half a request line,
or headers one byte a minute, would otherwise stay open for good; `GuardedH11Protocol` closes it once
`header_timeout_s` has passed without a complete head. Slow bodies are cut by `BodyLimitMiddleware`.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.settings import Settings


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)


_TRIM = _malloc_trim()


def return_freed_memory() -> bool:
    """Give the memory that the threads' heaps hold free back to the system (glibc's `malloc_trim`).

    glibc maps large blocks on their own at first, but raises that size each time one is freed (up to
    32 MiB); after that a request's window inputs, probability maps and masks come from the heap of the
    thread that made them, and once freed stay with the process: a field with 400 cells left
    180-200 MiB resident after its answer. Trimming once a long request is answered returns it (about
    70 MiB stays) while the heaps keep serving the next request's buffers without a page fault each (a
    fixed mapping threshold did the first and cost a third more time on that field; docs/reliability.md).
    A no-op off glibc.

    Returns:
        Whether memory was returned.
    """
    return _TRIM is not None and _TRIM(0) == 1


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the head is complete; the body has its own timeout
        elif self._head_deadline is None:
            self._arm()  # bytes of a next request's head started arriving

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class with the settings' header deadline."""
    return type("ConfiguredH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": settings.header_timeout_s})


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` that bound connections (README: Configuration)."""
    return {"http": guarded_protocol(settings), "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_keep_alive": settings.keep_alive_s, "limit_concurrency": settings.max_connections,
            "timeout_graceful_shutdown": int(settings.shutdown_timeout_s)}
