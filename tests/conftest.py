"""Shared test configuration: GPU marker handling, and the service fixtures (a tiny model exported once
per session by the project's own export, a slow variant of it, clients of apps with their lifespan
running) used by tests/app and tests/reliability alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from support.service import SLOW_INPUT, TINY_INPUT, copy_model, encode, running, sample_rgb

from app.api.settings import Settings


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_runtime_loads()


def _cuda_runtime_loads() -> bool:
    """Both the CUDA runtime the provider links and the driver library (absent without a GPU driver)."""
    import ctypes

    try:
        ctypes.CDLL("libcudart.so.13")
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (onnxruntime CUDA provider and libcudart.so.13)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _calibrated_tiny_model() -> Any:
    """A tiny attention U-Net whose untrained output still holds all three classes.

    Its head bias is shifted by the mean logits on a generated image, so that no class dominates and
    masks have areas worth measuring.
    """
    import torch

    from model_training.models import build_model
    from model_training.synthetic import make_sample
    from model_training.transforms import input_transform

    torch.manual_seed(0)
    model = build_model("attention_unet", base_channels=4, depth=2).eval()
    image, _ = make_sample(TINY_INPUT, seed=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(input_transform(TINY_INPUT)(image))[None])
        head: Any = model.head
        head.bias -= logits.mean(dim=(0, 2, 3))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`model.onnx` + `model.json` written by `model_training.export` from a tiny checkpoint."""
    import torch

    from model_training.export import ExportConfig, export
    from model_training.train import TrainConfig

    torch.set_num_threads(1)  # two shared cores: more threads only contend
    root = tmp_path_factory.mktemp("tiny")
    config = TrainConfig(synthetic=True, model="attention_unet", base_channels=4, depth=2,
                         input_size=TINY_INPUT)
    checkpoint = root / "best.pt"
    torch.save({"model": _calibrated_tiny_model().state_dict(), "epoch": 0, "best": 0.5,
                "config": asdict(config), "val_names": [],
                "classes": ["background", "cytoplasm", "nucleus"]}, checkpoint)
    export(ExportConfig(checkpoint=str(checkpoint), out_dir=str(root / "weights"), name="wbc-tiny",
                        version="0.0.1"))
    return root / "weights"


@pytest.fixture(scope="session")
def slow_model_path(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model told to run at 1024×1024: the same file, but every run takes a noticeable while."""
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    meta["input"]["size"] = [SLOW_INPUT, SLOW_INPUT]
    return copy_model(tiny_model_dir, tmp_path_factory.mktemp("slow"), input=meta["input"])


class IsolatedSettings(Settings):
    """Settings from arguments only: a `WBC_*` variable in the developer's shell cannot change a test."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@pytest.fixture
def settings_for(tiny_model_dir: Path) -> Callable[..., Settings]:
    """Settings for the tiny model, plus overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"model_path": tiny_model_dir / "model.onnx", "log_format": "text",
                                  "intra_op_threads": 1, "cpu_workers": 2, **overrides}
        return IsolatedSettings(**values)

    return make


@pytest.fixture
def client(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    """The service on the tiny model with default settings, model loaded."""
    with running(settings_for()) as c:
        yield c


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    """A 96×80 PNG of a generated cell."""
    return encode(sample_rgb())
