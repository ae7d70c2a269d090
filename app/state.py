"""What the app holds while it runs (settings, metrics, model, pipeline) and the dependencies to reach it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import NotReadyError
from app.inference import Segmenter
from app.metrics import Metrics
from app.pipeline import Pipeline


class Phase(str, enum.Enum):
    """Where the service is in its life."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


_NOT_READY_DETAIL = {
    Phase.LOADING: "The model is loading; retry shortly.",
    Phase.FAILED: "The model could not be loaded; the service log says why.",
    Phase.STOPPING: "The service is shutting down.",
}


@dataclass
class ServiceState:
    """Held on `app.state.service`; routes reach it through `get_state`."""

    settings: Settings
    metrics: Metrics
    phase: Phase = Phase.LOADING
    segmenter: Segmenter | None = None
    pipeline: Pipeline | None = None

    def set_phase(self, phase: Phase) -> None:
        """Move to `phase`; only READY counts as ready in the metrics."""
        self.phase = phase
        self.metrics.ready.set(1 if phase is Phase.READY else 0)

    def not_ready(self) -> NotReadyError:
        """The 503 for the current phase."""
        return NotReadyError(_NOT_READY_DETAIL.get(self.phase, "The service is not ready."),
                             headers={"Retry-After": str(self.settings.retry_after_s)})

    def require_segmenter(self) -> Segmenter:
        """The loaded model, or a 503."""
        if self.segmenter is None:
            raise self.not_ready()
        return self.segmenter

    def require_pipeline(self) -> Pipeline:
        """The pipeline while the model is loaded (in-flight work still runs while stopping), or a 503."""
        if self.pipeline is None:
            raise self.not_ready()
        return self.pipeline


# Both dependencies are `async def` although they only read attributes: FastAPI runs a plain `def`
# dependency on a worker thread, two thread hops per dependency on every request's critical path.
async def get_state(request: Request) -> ServiceState:
    """The running app's state."""
    state: ServiceState = request.app.state.service
    return state


async def get_pipeline(state: Annotated[ServiceState, Depends(get_state)]) -> Pipeline:
    """The pipeline, or 503 when the model is not loaded."""
    return state.require_pipeline()


StateDep = Annotated[ServiceState, Depends(get_state)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
