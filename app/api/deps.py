"""What the app holds while it runs (settings, metrics, engine, batcher) and the dependencies to reach it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from app.api.batching import Batcher
from app.api.metrics import Metrics
from app.api.settings import Settings
from app.engine import Engine
from app.engine.errors import NotReadyError


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
class Runtime:
    """The loaded engine, the batcher in front of its model, and the thread limit for engine work."""

    engine: Engine
    batcher: Batcher
    limiter: anyio.CapacityLimiter
    metrics: Metrics


@dataclass
class ServiceState:
    """Held on `app.state.service`; routes reach it through the dependencies below."""

    settings: Settings
    metrics: Metrics
    phase: Phase = Phase.LOADING
    runtime: Runtime | None = None

    def set_phase(self, phase: Phase) -> None:
        """Move to `phase`; only READY counts as ready in the metrics."""
        self.phase = phase
        self.metrics.ready.set(1 if phase is Phase.READY else 0)

    def not_ready(self) -> NotReadyError:
        """The 503 for the current phase."""
        return NotReadyError(_NOT_READY_DETAIL.get(self.phase, "The service is not ready."),
                             headers={"Retry-After": str(self.settings.retry_after_s)})

    def require_runtime(self) -> Runtime:
        """The runtime while the model is loaded (in-flight work still runs while stopping), or a 503."""
        if self.runtime is None:
            raise self.not_ready()
        return self.runtime


# `async def` although they only read attributes: FastAPI runs a plain `def` dependency on a worker
# thread, two thread hops per dependency on every request's critical path.
async def get_state(request: Request) -> ServiceState:
    """The running app's state."""
    state: ServiceState = request.app.state.service
    return state


async def get_runtime(state: Annotated[ServiceState, Depends(get_state)]) -> Runtime:
    """The runtime, or 503 when the model is not loaded."""
    return state.require_runtime()


async def get_settings_dep(state: Annotated[ServiceState, Depends(get_state)]) -> Settings:
    """The app's settings."""
    return state.settings


StateDep = Annotated[ServiceState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
