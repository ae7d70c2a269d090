"""Domain errors of the engine. Each carries the HTTP status it means, which the API maps once
(`app.api.errors`) and the folder command prints; nothing here knows about HTTP otherwise."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model or its metadata cannot be loaded; the service stays unready."""


class ServiceError(Exception):
    """An error with a status; subclasses set `status`, `slug` and `title`."""

    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidImageError(ServiceError):
    """The file claims a supported format but cannot be decoded (corrupt, truncated, empty)."""

    status, slug, title = 422, "invalid-image", "Invalid image"


class UnsupportedMediaError(ServiceError):
    """The file is not a PNG, JPEG, BMP or TIFF image."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class PayloadTooLargeError(ServiceError):
    """A request, file or image exceeds a configured limit."""

    status, slug, title = 413, "payload-too-large", "Payload too large"


class ImageTooLargeError(PayloadTooLargeError):
    """An image has more pixels than allowed; found from its header, before decoding."""

    slug, title = "image-too-large", "Image too large"


class TooManyFilesError(PayloadTooLargeError):
    """A batch holds more files than allowed."""

    slug, title = "too-many-files", "Too many files"


class TooManyCellsError(PayloadTooLargeError):
    """An image holds more leukocyte candidates than one image may (`WBC_MAX_CELLS`); found before any
    model run."""

    slug, title = "too-many-cells", "Too many cells"


class UnauthorizedError(ServiceError):
    """The API key is missing or wrong."""

    status, slug, title = 401, "unauthorized", "Unauthorized"


class OverloadedError(ServiceError):
    """The inference queue is full; the client should retry after `Retry-After` seconds."""

    status, slug, title = 503, "overloaded", "Service overloaded"


class NotReadyError(ServiceError):
    """The model is not loaded (still loading, failed to load, or shutting down)."""

    status, slug, title = 503, "not-ready", "Service not ready"


class ClientGoneError(ServiceError):
    """The client closed the connection; the work for it stops at the next stage boundary."""

    status, slug, title = 499, "client-closed-request", "Client closed request"
