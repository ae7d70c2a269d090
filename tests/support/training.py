"""What the training fixtures hand to tests (importable by name, unlike a conftest module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_training.train import TrainConfig


@dataclass
class TinyRun:
    """A finished training run: its folder, config and the dictionary `train` returned."""

    out: Path
    config: TrainConfig
    result: dict[str, Any]

    @property
    def best(self) -> Path:
        return self.out / "best.pt"


@dataclass
class TinyExport:
    """`wbc-export`'s output for the tiny run: its folder, return code and what it printed."""

    out: Path
    returncode: int
    stdout: str
    evaluation_report: dict[str, Any]

    @property
    def onnx(self) -> Path:
        return self.out / "model.onnx"
