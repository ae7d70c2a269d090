"""`create_app(settings=None)` and its lifespan: load and warm up the model, serve, drain, release."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.api.batching import Batcher
from app.api.deps import Phase, Runtime, ServiceState
from app.api.errors import install_error_handlers
from app.api.metrics import Metrics
from app.api.observability import REQUEST_ID_HEADER, RequestContextMiddleware, configure_logging
from app.api.routes import health, model, oip, problems, segment
from app.api.security import (
    API_KEY_HEADER,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    SecurityHeadersMiddleware,
    api_key_scheme,
)
from app.api.settings import Settings, get_settings
from app.engine import Engine
from app.engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_EXPOSED_HEADERS = [REQUEST_ID_HEADER, "Retry-After", "Content-Disposition",
                    "X-Area-Nucleus-Px", "X-Area-Cytoplasm-Px", "X-Area-Cell-Px", "X-Cell-Count"]


def _version() -> str:
    try:
        return metadata.version("wbc-segmenter")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Nothing heavy happens here; the model loads in the lifespan.

    Args:
        settings: defaults to `get_settings()` (the environment).
    """
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    # The batch limit: the multipart parser stops at the first file past it (not at Starlette's default
    # of 1000), and errors.py answers that with 413 too-many-files.
    app = FastAPI(title="WBC segmenter", version=_version(), lifespan=lifespan,
                  description="Segments white blood cells into nucleus and cytoplasm and measures them.",
                  form_limits={"max_files": settings.max_files})
    app.state.service = ServiceState(settings=settings, metrics=Metrics())
    # No slash-adding redirects: Starlette builds them from the request's Host header.
    app.router.redirect_slashes = False
    install_error_handlers(app)
    _include_routers(app, settings)
    _mount_static(app)
    _add_middleware(app, settings)
    return app


def _include_routers(app: FastAPI, settings: Settings) -> None:
    app.include_router(health.router)
    # The key is enforced by ApiKeyMiddleware before the body is read; this only documents it.
    guarded: dict[str, Any] = ({"dependencies": [Depends(api_key_scheme)], "responses": problems(401)}
                               if settings.api_key else {})
    app.include_router(model.router, **guarded)
    app.include_router(segment.router, **guarded)
    app.include_router(oip.router, **guarded)


def _mount_static(app: FastAPI) -> None:
    """Serve a browser page at `/` (and its assets under `/static`) when `app/static/index.html` exists."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(index)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # Added innermost first: the request context wraps everything, so every answer is logged and counted.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes,
                       chunk_timeout_s=settings.body_timeout_s, max_uploads=settings.max_uploads)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, REQUEST_ID_HEADER, "Content-Type"],
                           expose_headers=_EXPOSED_HEADERS, max_age=600)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.service.metrics)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model in the background (live answers at once, ready once warm), then drain on exit."""
    state: ServiceState = app.state.service
    loader = asyncio.create_task(_load(state))
    restore_signals = _on_termination(lambda: begin_shutdown(state))
    try:
        yield
    finally:
        restore_signals()
        begin_shutdown(state)
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        await _release(state)


async def _load(state: ServiceState) -> None:
    settings = state.settings
    try:
        engine = await anyio.to_thread.run_sync(Engine.open, settings.engine_config(),
                                                settings.decode_limits(), settings.max_batch_pixels,
                                                settings.max_cells, settings.max_batch_cells)
    except ModelLoadError as exc:
        logger.error("model not loaded, the service stays unready: %s", exc)
        state.set_phase(Phase.FAILED)
        return
    except Exception:
        logger.exception("model not loaded, the service stays unready")
        state.set_phase(Phase.FAILED)
        return
    model = engine.model
    batcher = Batcher(model.run, model.max_batch_size, settings.max_wait_ms, settings.queue_size,
                      settings.retry_after_s, observe=state.metrics.observe_run,
                      on_reject=state.metrics.rejected.inc, workers=model.workers)
    batcher.start()
    state.metrics.watch_queue(batcher.depth)
    state.metrics.watch_admitted(batcher.admitted_count, batcher.full)
    meta = engine.metadata
    state.metrics.model.info({"name": meta.name, "version": meta.version, "sha256": meta.sha256,
                              "file": model.path.name, "provider": model.provider})
    # Threads that wait on the batcher hold a token without using a core: room for a full batch
    # to gather on top of the threads that decode and encode.
    limiter = anyio.CapacityLimiter(settings.cpu_workers + model.max_batch_size * model.workers)
    state.runtime = Runtime(engine, batcher, limiter, state.metrics)
    if state.phase is Phase.LOADING:
        state.set_phase(Phase.READY)


def begin_shutdown(state: ServiceState) -> None:
    """Turn readiness off; requests in flight (and any still arriving) are served until the server stops."""
    if state.phase is not Phase.STOPPING:
        logger.info("shutting down: readiness off, finishing requests in flight")
        state.set_phase(Phase.STOPPING)


async def _release(state: ServiceState) -> None:
    if state.runtime is not None:
        await anyio.to_thread.run_sync(state.runtime.batcher.stop, state.settings.shutdown_timeout_s)
    state.runtime = None
    logger.info("model released")


def _on_termination(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` on SIGTERM/SIGINT before the server's own handler, so that readiness turns 503
    while the server drains. Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        callback()
        prior = previous[signal.Signals(signum)]
        if callable(prior):
            prior(signum, frame)
        else:
            signal.signal(signum, prior or signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, prior in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prior)

    return restore
