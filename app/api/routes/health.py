"""Liveness, readiness and Prometheus metrics: always open, never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import Phase, StateDep
from app.api.routes import problems
from app.api.schemas import Live, Ready
from app.engine.errors import NotReadyError

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Live, summary="The process is running")
async def live() -> Live:
    """200 as long as the process runs; answered on the event loop, never behind inference."""
    return Live()


@router.get("/health/ready", response_model=Ready, responses=problems(503),
            summary="The model is loaded and warmed up")
async def ready(state: StateDep) -> Ready:
    """200 once the model is loaded and warmed up; 503 while loading, after a failed load, and
    from the moment shutdown begins."""
    if state.phase is not Phase.READY or state.runtime is None:
        raise state.not_ready()
    if state.runtime.batcher.full():
        raise NotReadyError("Every place in the inference queue is taken; send work elsewhere or retry "
                            "shortly.", headers={"Retry-After": str(state.settings.retry_after_s)})
    model = state.runtime.engine.model
    return Ready(model=model.metadata.name, version=model.metadata.version, provider=model.provider)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: StateDep) -> Response:
    """Request counts and latencies by route and status, inference time, batch sizes, queue depth."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
