"""Prometheus metrics of one app instance, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """HTTP, inference and model metrics; one registry per app so that several apps can coexist."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
        self.requests = Counter("http_requests_total", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("http_request_duration_seconds", "HTTP request latency by route and status.",
                                 ["method", "route", "status"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("http_requests_in_progress", "HTTP requests being served.",
                                 ["method"], registry=registry)
        self.inference = Histogram("wbc_inference_seconds", "Duration of one onnxruntime session run.",
                                   buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("wbc_inference_batch_size", "Images per onnxruntime session run.",
                                    buckets=_BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge("wbc_inference_queue_depth", "Requests waiting for the inference worker.",
                                 registry=registry)
        self.admitted = Gauge("wbc_requests_admitted", "Requests holding a place (decoding, queued, run).",
                              registry=registry)
        self.saturated = Gauge("wbc_saturated", "1 while every place is taken: new requests get 503.",
                               registry=registry)
        self.rejected = Counter("wbc_inference_rejected_total", "Requests refused: the queue was full.",
                                registry=registry)
        self.images = Counter("wbc_images_total", "Images received, by outcome.", ["outcome"],
                              registry=registry)
        self.ready = Gauge("wbc_ready", "1 when the model is loaded and the service accepts work.",
                           registry=registry)
        self.model = Info("wbc_model", "The model being served.", registry=registry)

    def observe_run(self, batch_size: int, seconds: float) -> None:
        """Record one session run."""
        self.inference.observe(seconds)
        self.batch_size.observe(batch_size)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from `depth()` at every scrape."""
        self.queue_depth.set_function(depth)

    def watch_admitted(self, admitted: Callable[[], int], full: Callable[[], bool]) -> None:
        """Read the admitted requests and saturation at every scrape."""
        self.admitted.set_function(admitted)
        self.saturated.set_function(lambda: 1.0 if full() else 0.0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
