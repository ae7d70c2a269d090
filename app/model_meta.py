"""The `model.json` contract: its schema, loading it, and checking the ONNX file against it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app import CLASS_NAMES
from app.errors import ModelLoadError

SCHEMA_VERSION = 1


class InputSpec(BaseModel):
    """What the network takes: an `(N, 3, height, width)` float32 RGB tensor."""

    name: str
    size: tuple[int, int] = Field(description="(height, width) the image is resized to")
    channels: Literal[3] = 3
    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    resize: Literal["bilinear"] = "bilinear"

    @field_validator("size")
    @classmethod
    def _positive(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError("input size must be positive")
        return size


class OutputSpec(BaseModel):
    """What the network returns: `(N, classes, height, width)` logits."""

    name: str
    kind: Literal["logits"] = "logits"
    layout: Literal["NCHW"] = "NCHW"


class Normalization(BaseModel):
    """`x = (pixel * scale - mean) / std` per channel, in RGB order."""

    scale: float = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @field_validator("std")
    @classmethod
    def _nonzero(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("std must be positive")
        return std


class ModelMetadata(BaseModel):
    """`weights/model.json` as written by the export: everything the service needs to run the model."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    schema_version: Literal[1]
    name: str
    version: str
    architecture: str
    parameters: int = Field(ge=0)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=1)
    input: InputSpec
    output: OutputSpec
    normalization: Normalization
    classes: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None

    @field_validator("classes")
    @classmethod
    def _has_api_classes(cls, classes: list[str]) -> list[str]:
        """Any order is accepted (the service reorders); every class of the API must be there once."""
        if sorted(classes) != sorted(CLASS_NAMES):
            raise ValueError(f"classes must be {', '.join(CLASS_NAMES)} in some order, got {classes}")
        return classes


def load_metadata(path: Path) -> ModelMetadata:
    """Read and validate a `model.json`.

    Raises:
        ModelLoadError: the file is missing, not JSON, or does not match the schema.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"cannot read model metadata {path}: {exc.strerror or exc}") from exc
    try:
        return ModelMetadata.model_validate_json(text)
    except ValidationError as exc:
        raise ModelLoadError(f"invalid model metadata {path}: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_file(path: Path, metadata: ModelMetadata) -> None:
    """Check that the ONNX file is the one the metadata describes.

    Raises:
        ModelLoadError: the file is missing or its SHA-256 differs from `metadata.sha256`.
    """
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if actual != metadata.sha256:
        raise ModelLoadError(f"sha256 of {path} is {actual}, but model metadata says {metadata.sha256}; "
                             "the model file and model.json do not belong together")
