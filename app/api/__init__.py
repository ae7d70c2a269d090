"""The HTTP service around the engine: FastAPI app, settings, routes, middleware, batcher."""
