"""Helpers of the service tests: running an app, making images in every format, checking problems."""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.api.main import create_app
from app.api.settings import Settings

#: Input size of the tiny model: not the shipped 160, so that a hard-coded size would show.
TINY_INPUT = 64
#: Input size written into the "slow" copy of the tiny model's metadata: same file, much more work per run.
SLOW_INPUT = 1024


def copy_model(source: Path, target: Path, **changes: Any) -> Path:
    """Copy a model folder, changing top-level keys of its `model.json`; returns the new `model.onnx`."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "model.onnx", target / "model.onnx")
    meta = json.loads((source / "model.json").read_text())
    meta.update(changes)
    (target / "model.json").write_text(json.dumps(meta))
    return target / "model.onnx"


def wait_until_loaded(client: TestClient, timeout_s: float = 60.0) -> None:
    """Wait until the model has loaded, or failed to (the lifespan loads it in the background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/health/ready")
        if response.status_code == 200 or "loading" not in response.json()["detail"]:
            return
        time.sleep(0.02)
    raise TimeoutError("the model did not finish loading")


@contextmanager
def running(settings: Settings, **client_args: Any) -> Iterator[TestClient]:
    """A client of `create_app(settings)` with the lifespan running and the model loaded (or failed)."""
    with TestClient(create_app(settings), **client_args) as client:
        wait_until_loaded(client)
        yield client


def sample_rgb(width: int = 96, height: int = 80, seed: int = 0) -> np.ndarray:
    """A generated smear-like RGB image `(height, width, 3)` uint8."""
    from model_training.synthetic import make_sample

    image, _ = make_sample((height, width), seed=seed)
    return image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params: Any) -> bytes:
    """Encode an image (array or Pillow) into a file's bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def problem(response: Any, status: int) -> dict[str, Any]:
    """Assert `response` is an RFC 9457 problem with `status`; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert "Traceback" not in response.text
    return dict(body)


def png_array(data: bytes) -> np.ndarray:
    """The pixel values of a PNG as stored (palette indices for a palette PNG)."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def upload(data: bytes, name: str = "cell.png") -> dict[str, tuple[str, bytes]]:
    """The `files=` of a single-image request."""
    return {"file": (name, data)}


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte: for what Pillow cannot write (16-bit RGB) or would refuse (huge headers).

    Args:
        rows: the filtered scanlines (each starting with its filter byte), compressed here.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of `(H, W, 3)` uint16 pixels."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return raw_png(width, height, 16, 2, rows)
