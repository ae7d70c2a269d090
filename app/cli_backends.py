"""Where `wbc-segment` segments its images: the model in this process, or a running service over HTTP.

Both return, per file, the service's own JSON for it (a result, or `{"filename", "error"}`) and the
encoded mask and overlay, made by the same engine code the service uses.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from PIL import Image

from app.api.settings import Settings
from app.engine import Engine, Options, Result, Upload
from app.engine.errors import ModelLoadError
from app.engine.geometry import geojson_document
from app.engine.imaging import decode_image, encode_overlay_png
from app.engine.report import cell_from_document, item_document

_MAX_RETRY_AFTER_S = 30.0


class FatalError(RuntimeError):
    """The run cannot go on: no model, the service unreachable or refusing the API key."""


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: the service's JSON for it, and its PNGs and GeoJSON when it was segmented."""

    record: dict[str, Any]
    mask_png: bytes | None = None
    overlay_png: bytes | None = None
    instances_png: bytes | None = None
    geojson: dict[str, Any] | None = None


class Backend(Protocol):
    chunk_size: int
    model: dict[str, str]

    def segment(self, paths: list[Path], pixel_size_um: float | None) -> list[FileResult]:
        """One result per path, in order; a file that fails becomes a failure record."""
        ...  # pragma: no cover


def failure(filename: str, status: int | None, title: str, detail: str) -> FileResult:
    return FileResult({"filename": filename, "error": {"status": status, "title": title, "detail": detail}})


def read_file(path: Path) -> bytes | FileResult:
    """The file's bytes, or its failure record when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return failure(path.name, None, "Cannot read the file", exc.strerror or str(exc))


def local_settings(model_path: Path | None, device: str | None, batch_size: int,
                   **fields: Any) -> Settings:
    """The environment's WBC_* settings, as the service reads them, with the folder command's choices
    (and `fields`, e.g. a Ray actor's `intra_op_threads`) on top."""
    overrides: dict[str, Any] = {"max_batch_size": min(batch_size, 256), "warmup_runs": 0, **fields}
    if model_path is not None:
        overrides["model_path"] = model_path
    if device is not None:
        overrides["device"] = device
    return Settings(**overrides)


class LocalBackend:
    """The model in this process, through the same `Engine` the service runs.

    Args:
        settings: default `local_settings(model_path, device, batch_size)`; a Ray job passes the
            settings its driver read, so that every actor runs the model the same way.
    """

    def __init__(self, model_path: Path | None, device: str | None, batch_size: int, overlays: bool,
                 geojson: bool = False, settings: Settings | None = None) -> None:
        settings = settings or local_settings(model_path, device, batch_size)
        try:
            self.engine = Engine.open(settings.engine_config(), settings.decode_limits())
        except ModelLoadError as exc:
            raise FatalError(f"cannot load the model: {exc}") from exc
        self.overlays = overlays
        self.geojson = geojson
        self.chunk_size = batch_size
        self.model = self.engine.model_ref

    def segment(self, paths: list[Path], pixel_size_um: float | None) -> list[FileResult]:
        return self.segment_contents([p.name for p in paths], [read_file(p) for p in paths], pixel_size_um)

    def segment_contents(self, names: list[str], contents: Sequence[bytes | Upload | FileResult],
                         pixel_size_um: float | None) -> list[FileResult]:
        """`segment` of files already read (bytes) or decoded (an `Upload` with `decoded`): one result per
        name, a `FileResult` content kept as it is."""
        uploads = [c if isinstance(c, Upload) else Upload(n, c)
                   for n, c in zip(names, contents, strict=True) if not isinstance(c, FileResult)]
        options = Options(pixel_size_um, mask_png=True, overlay_png=self.overlays, instances_png=True,
                          geojson=self.geojson)
        done = iter(self.engine.segment_many(uploads, options))
        results = []
        for content in contents:
            if isinstance(content, FileResult):
                results.append(content)
                continue
            item = next(done)
            if isinstance(item, Result):
                results.append(FileResult(item_document(item), item.mask_png, item.overlay_png,
                                          item.instances_png, item.geojson))
            else:
                results.append(FileResult(item_document(item)))
        return results


class RemoteBackend:
    """A running service: `POST /v1/segment/batch?format=json&include_mask=true`, in chunks."""

    def __init__(self, url: str, api_key: str | None, batch_size: int, overlays: bool, retries: int = 4,
                 timeout_s: float = 300.0, transport: httpx.BaseTransport | None = None,
                 geojson: bool = False) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.retries = retries
        self.overlays = overlays
        self.geojson = geojson
        self.chunk_size = batch_size
        ready = self._ready()
        self.model = {"name": ready.get("model", ""), "version": ready.get("version", "")}

    def _ready(self) -> dict[str, Any]:
        try:
            response = self.client.get("/health/ready")
        except httpx.HTTPError as exc:
            raise FatalError(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code != 200:
            raise FatalError(f"{self.url} is not ready ({response.status_code}): {_problem(response)[1]}")
        return dict(response.json())

    def segment(self, paths: list[Path], pixel_size_um: float | None) -> list[FileResult]:
        if len(paths) > self.chunk_size:  # the service took fewer files than asked before
            half = self.chunk_size
            return self.segment(paths[:half], pixel_size_um) + self.segment(paths[half:], pixel_size_um)
        contents = [read_file(p) for p in paths]
        sendable = [(p, c) for p, c in zip(paths, contents, strict=True) if isinstance(c, bytes)]
        answers = iter(self._send(sendable, pixel_size_um) if sendable else [])
        return [c if isinstance(c, FileResult) else next(answers) for c in contents]

    def _send(self, items: list[tuple[Path, bytes]], pixel_size_um: float | None) -> list[FileResult]:
        params: dict[str, Any] = {"format": "json", "include_mask": "true", "include_instances": "true"}
        if pixel_size_um is not None:
            params["pixel_size_um"] = pixel_size_um
        files = [("files", (path.name, data, "application/octet-stream")) for path, data in items]
        response = self._post(params, files)
        if response.status_code == 413 and len(items) > 1:  # too many files or bytes: halve and retry
            self.chunk_size = max(1, min(self.chunk_size, len(items) // 2))
            half = len(items) // 2
            return self._send(items[:half], pixel_size_um) + self._send(items[half:], pixel_size_um)
        if response.status_code == 401:
            raise FatalError(f"the service refused the API key: {_problem(response)[1]}")
        if response.status_code != 200:
            title, detail = _problem(response)
            return [failure(path.name, response.status_code, title, detail) for path, _ in items]
        records = response.json()["results"]
        return [self._result(record, data) for (_, data), record in zip(items, records, strict=True)]

    def _post(self, params: dict[str, Any], files: list[Any]) -> httpx.Response:
        """POST, waiting out 503 answers (queue full, model loading) as `Retry-After` says, a few times."""
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post("/v1/segment/batch", params=params, files=files)
            except httpx.HTTPError as exc:
                raise FatalError(f"lost the connection to {self.url}: {exc}") from exc
            if response.status_code != 503 or attempt == self.retries:
                return response
            time.sleep(_retry_after(response))
        raise AssertionError("unreachable")

    def _result(self, record: dict[str, Any], data: bytes) -> FileResult:
        if "error" in record:
            return FileResult(record)
        mask_png = base64.b64decode(record.pop("mask_png_base64"))
        # A service older than API v1.1 sends no instance mask and no cells.
        encoded = record.pop("instances_png_base64", None)
        instances_png = base64.b64decode(encoded) if encoded else None
        overlay, geojson = None, None
        if self.overlays and instances_png is None:
            mask = np.asarray(Image.open(io.BytesIO(mask_png)))
            overlay = encode_overlay_png(np.asarray(decode_image(data, mask.size)), mask)
        elif instances_png is not None and (self.overlays or self.geojson):
            # Made here with the engine's own code: the JSON answer carries the masks, not these.
            mask = np.asarray(Image.open(io.BytesIO(mask_png)))
            instances = np.asarray(Image.open(io.BytesIO(instances_png)))
            cells = [cell_from_document(c) for c in record["cells"]]
            if self.overlays:
                overlay = encode_overlay_png(np.asarray(decode_image(data, mask.size)), mask, instances,
                                             [(c.id, c.centroid) for c in cells])
            if self.geojson:
                geojson = geojson_document(cells, instances, mask)
        return FileResult(record, mask_png, overlay, instances_png, geojson)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return 1.0


def _problem(response: httpx.Response) -> tuple[str, str]:
    """Title and detail of a problem response, or the status line."""
    try:
        body = response.json()
        return str(body.get("title", response.reason_phrase)), str(body.get("detail", ""))
    except ValueError:
        return response.reason_phrase, response.text[:200]
