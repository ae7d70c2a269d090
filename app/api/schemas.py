"""Request and response models: the public API as documented in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """An RFC 9457 problem document; every error response has this shape."""

    type: str = Field(examples=["urn:wbc-segmenter:problem:invalid-image"])
    title: str = Field(examples=["Invalid image"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["The PNG file is corrupt or truncated."])
    errors: list[dict[str, Any]] | None = Field(None, description="Per-field issues of a 422 invalid request")


class Live(BaseModel):
    """The process is running."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """The model is loaded, warmed up and served on `provider`."""

    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ready"] = "ready"
    model: str
    version: str
    provider: str = Field(examples=["CUDAExecutionProvider", "CPUExecutionProvider"])


class Areas(BaseModel):
    """Areas in pixels; the cell is cytoplasm ∪ nucleus."""

    nucleus: int
    cytoplasm: int
    cell: int


class AreasUm2(BaseModel):
    """Areas in square microns."""

    nucleus: float
    cytoplasm: float
    cell: float


class Fractions(BaseModel):
    """Areas as fractions of the whole image."""

    nucleus: float
    cytoplasm: float
    cell: float


class ModelRef(BaseModel):
    """Which model produced a result, and how it ran."""

    name: str
    version: str = Field(description="The model's version; `+int8` for its int8 variant")
    tta: str | None = Field(default=None, description="Test-time augmentation of the run: none, mirror or "
                                                      "dihedral (see /v1/model)")


class CellResult(BaseModel):
    """One leukocyte: its id in the instance mask, where it is and what it measures."""

    id: int = Field(description="The cell's value in the instance mask (1..cell_count)")
    bbox: tuple[int, int, int, int] = Field(description="x, y, width, height of the cell, in input pixels")
    centroid: tuple[float, float] = Field(description="x, y")
    areas_px: Areas
    areas_um2: AreasUm2 | None
    nc_ratio: float | None
    touches_border: bool = Field(description="The cell is cut by the image edge: its areas are partial")
    score: float = Field(ge=0, le=1, description="How sure the service is that this is one whole leukocyte")


class SegmentResult(BaseModel):
    """Measurements of one segmented image: every leukocyte pooled (v1), and each on its own (v1.1)."""

    model_config = ConfigDict(protected_namespaces=())

    filename: str
    width: int
    height: int
    areas_px: Areas
    areas_um2: AreasUm2 | None = Field(description="With pixel_size_um only")
    fractions: Fractions
    nc_ratio: float | None = Field(description="nucleus / cytoplasm area; null without cytoplasm")
    model: ModelRef
    inference_ms: float = Field(description="Duration of the model run that included this image's cells")
    cell_count: int
    primary_cell_id: int | None = Field(description="The cell under the image centre, else the nearest one "
                                                    "whose box covers at least 10 % of the image")
    pixel_size_um: float | None = Field(description="The pixel size the areas in µm² used")
    pixel_size_source: Literal["request", "file"] | None
    cells: list[CellResult]
    mask_png_base64: str | None = Field(None, description="The label mask as PNG; with include_mask only")
    instances_png_base64: str | None = Field(None, description="The 16-bit instance PNG; with "
                                                               "include_instances only")


class FileError(BaseModel):
    """Why one file of a batch could not be processed."""

    status: int = Field(examples=[422])
    title: str
    detail: str


class FileFailure(BaseModel):
    """A file of a batch that could not be processed; the others are unaffected."""

    filename: str
    error: FileError


class BatchResult(BaseModel):
    """Per-file results in upload order."""

    count: int
    failed: int
    results: list[SegmentResult | FileFailure]


class InputInfo(BaseModel):
    """The network input."""

    size: tuple[int, int] = Field(description="(height, width)")
    color: str
    resize: str


class NormalizationInfo(BaseModel):
    """Per-channel `(pixel * scale - mean) / std`."""

    scale: float
    mean: list[float]
    std: list[float]


class StainInfo(BaseModel):
    """Stain normalisation before `normalization`: each network input moved, per CIELAB channel, to this
    mean and standard deviation (Reinhard)."""

    method: str
    space: str
    mean: list[float]
    std: list[float]


class ModelInfo(BaseModel):
    """The model being served, from its metadata, and the execution providers in use."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    architecture: str
    parameters: int
    classes: list[str] = Field(description="Class names in the order of the API's class ids")
    input: InputInfo
    normalization: NormalizationInfo
    stain_normalization: StainInfo | None = Field(
        default=None, description="stain normalisation the engine applies first; null: none")
    sha256: str
    opset: int
    file: str = Field(description="The model file served: model.int8.onnx on the CPU when its gate passed "
                                  "and it agrees with the fp32 model on this CPU")
    int8_agreement: float | None = Field(
        default=None,
        description="Least share of pixels of drawn crops to which the int8 variant gave the fp32 model's "
                    "class at start-up on this CPU (below 0.98 it is not served); null when no int8 variant "
                    "was considered")
    provider: str
    providers: list[str]
    tta: str = Field(description="Test-time augmentation of every run: none, mirror (4 runs) or dihedral "
                                 "(8 runs; WBC_TTA, default dihedral on CUDA and none on the CPU)")
    evaluation: dict[str, Any]
    created: str | None
