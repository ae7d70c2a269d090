"""The service on Ray Serve: the same FastAPI app (`app.api.main:create_app`) in every replica.

    serve run deploy.ray.serve_app:app              # from the repository root, on a running cluster
    serve deploy deploy/ray/serve_config.yaml       # replicas, GPUs and autoscaling from the file

Each replica builds the app from its own `WBC_*` environment (the config's `runtime_env.env_vars`) and runs
its lifespan, as uvicorn would: the model loads once per replica, readiness turns on when it is warm, and
the replica's batcher merges the requests that Serve routes to it into model runs. Serve's proxy spreads
requests over the replicas and its autoscaler follows the requests in flight per replica
(`target_ongoing_requests`). Every answer names the replica that made it in `X-Serve-Replica`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from app.api.deps import Phase
from app.api.main import create_app

REPLICA_HEADER = "x-serve-replica"
_app: FastAPI | None = None  # this replica's app, for the health check


class ReplicaHeaderMiddleware:
    """Adds `X-Serve-Replica: <replica id>` to every HTTP answer (pure ASGI, bodies untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replica = serve.get_replica_context().replica_id.unique_id.encode()

        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), replica)]
            await send(message)

        await self.app(scope, receive, send_named)


def build_app() -> FastAPI:
    """The service's app with the replica header; called in each replica as it starts."""
    global _app
    _app = create_app()
    _app.add_middleware(ReplicaHeaderMiddleware)
    return _app


@serve.deployment(
    # One replica per GPU: the replica's batcher fills the GPU; more requests in flight than the batch
    # size only wait in its queue, so Serve adds a replica before they pile up there.
    ray_actor_options={"num_cpus": 4, "num_gpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                        "upscale_delay_s": 10, "downscale_delay_s": 300},
    max_ongoing_requests=32,
    # Model loading is seconds; a replica is killed only after it stopped answering for a while.
    health_check_period_s=10,
    health_check_timeout_s=30,
    # The service drains requests in flight on shutdown (settings.shutdown_timeout_s).
    graceful_shutdown_timeout_s=35,
)
@serve.ingress(build_app)
class Segmenter:
    """The WBC segmentation service as one Serve deployment."""

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose model failed to load is replaced; one still loading
        is healthy (its readiness answers 503 meanwhile)."""
        if _app is not None and _app.state.service.phase is Phase.FAILED:
            raise RuntimeError("the model could not be loaded; the replica log says why")


app = Segmenter.bind()
