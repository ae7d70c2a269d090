"""Service settings, read from `WBC_*` environment variables; the only module that reads the environment."""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent
_MIB = 1024 * 1024


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota)) if quota else count)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


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
    intra_op_threads: int = Field(default_factory=available_cpus, ge=1)
    inter_op_threads: int = Field(default=1, ge=1)
    ort_spinning: bool = False
    # glibc malloc: buffers below this many MiB come from the heap and are reused (app/allocator.py);
    # 0 leaves the C library's defaults.
    malloc_mmap_threshold_mib: int = Field(default=32, ge=0, le=1024)
    warmup_runs: int = Field(default=1, ge=0)

    # Inference queue and micro-batching.
    # None: chosen for the provider in use (see inference.AUTO_BATCH_SIZE).
    max_batch_size: int | None = Field(default=None, ge=1, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    # None: chosen for the provider in use (see inference.inference_workers_for).
    inference_workers: int | None = Field(default=None, ge=1, le=64)
    queue_size: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    cpu_workers: int = Field(default_factory=available_cpus, ge=1)

    # Request limits.
    max_file_bytes: int = Field(default=20 * _MIB, ge=1)
    max_request_bytes: int = Field(default=100 * _MIB, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
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

    @property
    def metadata_file(self) -> Path:
        """`metadata_path`; else the model's own `<stem>.json` beside it if there is one (`model.int8.onnx`
        → `model.int8.json`), else `model.json` next to the model file."""
        if self.metadata_path:
            return self.metadata_path
        own = self.model_path.with_suffix(".json")
        return own if own.is_file() else self.model_path.with_name("model.json")


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
