"""Service settings, read from `WBC_*` environment variables; the only module that reads the environment."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.engine.augment import Setting
from app.engine.imaging import DecodeLimits
from app.engine.session import ModelConfig, available_cpus

_REPO_ROOT = Path(__file__).resolve().parent.parent
_MIB = 1024 * 1024


def _default_model_path() -> Path:
    """`weights/model.onnx` under the working directory, else under the source tree."""
    relative = Path("weights/model.onnx")
    for base in (Path.cwd(), _REPO_ROOT):
        if (base / relative).is_file():
            return base / relative
    return Path.cwd() / relative


class Settings(BaseSettings):
    """Everything that can be configured; each field `x` is read from the environment as `WBC_X`."""

    model_config = SettingsConfigDict(env_prefix="WBC_", extra="ignore", protected_namespaces=())

    # The model.
    model_path: Path = Field(default_factory=_default_model_path)
    metadata_path: Path | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cuda_device_id: int = Field(default=0, ge=0)
    # auto: on the CPU, the int8 variant beside the model when its Dice gate passed; fp32: never int8.
    precision: Literal["auto", "fp32"] = "auto"
    intra_op_threads: int = Field(default_factory=available_cpus, ge=1)
    # Test-time augmentation (engine.augment); auto: dihedral on CUDA, none on the CPU.
    tta: Setting = "auto"
    warmup_runs: int = Field(default=1, ge=0)

    # Inference queue and micro-batching.
    # None: chosen for the provider in use (see engine.session.AUTO_BATCH_SIZE).
    max_batch_size: int | None = Field(default=None, ge=1, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    # None: one run per CPU for an int8 model on the CPU, else one (see engine.session.auto_workers).
    inference_workers: int | None = Field(default=None, ge=1, le=64)
    queue_size: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    cpu_workers: int = Field(default_factory=available_cpus, ge=1)

    # Request limits.
    max_file_bytes: int = Field(default=20 * _MIB, ge=1)
    max_request_bytes: int = Field(default=100 * _MIB, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_image_side: int = Field(default=30_000, ge=1)
    max_aspect_ratio: float = Field(default=50.0, ge=1.0)
    max_jpeg_scans: int = Field(default=100, ge=1)
    # All the files of one batch request together (each file is also held to max_pixels).
    max_batch_pixels: int = Field(default=200_000_000, ge=1)
    # Leukocyte candidates (each a model run) of one image, and of all the files of one batch request:
    # past either, the image gets 413 before any run.
    max_cells: int = Field(default=500, ge=1)
    max_batch_cells: int = Field(default=1000, ge=1)
    # Connections (python -m app): a request's line and headers must arrive within this many seconds,
    # each chunk of its body within body_timeout_s; at most max_header_bytes of headers; at most
    # max_connections connections and max_uploads bodies being received at once.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    max_header_bytes: int = Field(default=65_536, ge=4096)
    max_connections: int = Field(default=256, ge=1)
    max_uploads: int = Field(default=16, ge=1)
    max_files: int = Field(default=64, ge=1)

    # Access.
    api_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Logging and the built-in server (`python -m app`).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    shutdown_timeout_s: float = Field(default=30.0, ge=0.0)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """Accept a comma-separated string (`https://a.org,https://b.org`) as well as a list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        """`WBC_API_KEY=` (empty) switches the key off instead of requiring an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    def decode_limits(self) -> DecodeLimits:
        """What one file may ask of the decoder."""
        return DecodeLimits(max_pixels=self.max_pixels, max_side=self.max_image_side,
                            max_aspect=self.max_aspect_ratio, max_jpeg_scans=self.max_jpeg_scans)

    def engine_config(self) -> ModelConfig:
        """What the engine needs to load the model."""
        return ModelConfig(model_path=self.model_path, metadata_path=self.metadata_path, device=self.device,
                           cuda_device_id=self.cuda_device_id, intra_op_threads=self.intra_op_threads,
                           precision=self.precision, max_batch_size=self.max_batch_size,
                           inference_workers=self.inference_workers, warmup_runs=self.warmup_runs,
                           tta=self.tta)


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
