"""The model contract: `model.json`'s schema, read and written through `ModelMetadata`, the class and
region names, the normalisation training uses, and checking an ONNX file against its metadata.

Both halves meet here: export writes a `ModelMetadata`, the engine reads one; nothing else in the
project spells out class names, mean/std or the metadata file's location."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.engine.errors import ModelLoadError

#: 1: the first contract; 2: adds `stain` (a reader of version 1 would ignore it and feed the network
#: unnormalised windows, so a model with a stain normalisation must say 2, which such a reader refuses).
SCHEMA_VERSION: Literal[1] = 1
STAIN_SCHEMA_VERSION: Literal[2] = 2
#: Class ids of the public API, in this order in every mask, response and report.
CLASS_NAMES: tuple[str, ...] = ("background", "cytoplasm", "nucleus")
#: Measured regions; the cell is cytoplasm ∪ nucleus.
REGIONS: tuple[str, ...] = ("nucleus", "cytoplasm", "cell")


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


def _positive(std: tuple[float, float, float]) -> tuple[float, float, float]:
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError("std must be positive and finite")
    return std


#: Three standard deviations, each above zero.
PositiveStd = Annotated[tuple[float, float, float], AfterValidator(_positive)]


class Normalization(BaseModel):
    """`x = (pixel * scale - mean) / std` per channel, in RGB order."""

    scale: float = Field(gt=0)
    mean: tuple[float, float, float]
    std: PositiveStd


class StainNormalization(BaseModel):
    """Stain normalisation before `Normalization` (`app.engine.stain`): the network's input is moved, per
    CIELAB channel, to this mean and standard deviation, the reference statistics of the training set."""

    method: Literal["reinhard"] = "reinhard"
    space: Literal["CIELAB"] = "CIELAB"
    mean: tuple[float, float, float]
    std: PositiveStd


#: What training normalises with (ImageNet statistics on pixels scaled to [0, 1]); export records it.
DEFAULT_NORMALIZATION = Normalization(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class ModelMetadata(BaseModel):
    """`weights/model.json` as written by the export: everything the service needs to run the model."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    schema_version: Literal[1, 2]
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
    stain: StainNormalization | None = Field(
        default=None, description="stain normalisation before `normalization`; null: none")
    classes: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    quantization: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None

    @field_validator("classes")
    @classmethod
    def _has_api_classes(cls, classes: list[str]) -> list[str]:
        """Any order is accepted (the service reorders); every class of the API must be there once."""
        if sorted(classes) != sorted(CLASS_NAMES):
            raise ValueError(f"classes must be {', '.join(CLASS_NAMES)} in some order, got {classes}")
        return classes

    @model_validator(mode="after")
    def _stain_needs_schema_2(self) -> ModelMetadata:
        if self.stain is not None and self.schema_version < STAIN_SCHEMA_VERSION:
            raise ValueError(f"stain normalisation needs schema_version {STAIN_SCHEMA_VERSION}")
        return self

    @classmethod
    def load(cls, path: Path) -> ModelMetadata:
        """Read and validate a `model.json`.

        Raises:
            ModelLoadError: the file is missing, not JSON, or does not match the schema.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelLoadError(f"cannot read model metadata {path}: {exc.strerror or exc}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ModelLoadError(f"invalid model metadata {path}: {exc}") from exc

    @classmethod
    def for_model(cls, model_path: Path) -> ModelMetadata:
        """The metadata of the model file at `model_path` (see `metadata_path`)."""
        return cls.load(metadata_path(model_path))

    def write(self, path: Path) -> None:
        """Write as indented JSON (fields left at their defaults are written too)."""
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @property
    def int8_gate_passed(self) -> bool:
        """Whether this is a quantized variant whose validation Dice passed its gate at quantization."""
        return bool(self.quantization.get("validation", {}).get("accepted"))

    @property
    def ref(self) -> dict[str, str]:
        """`{"name", "version"}`: which model produced a result."""
        return {"name": self.name, "version": self.version}


def metadata_path(model_path: Path) -> Path:
    """The model's own `<stem>.json` beside it if there is one (`model.int8.onnx` → `model.int8.json`),
    else `model.json` next to the model file."""
    own = model_path.with_suffix(".json")
    return own if own.is_file() else model_path.with_name("model.json")


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
