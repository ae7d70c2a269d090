"""Load what `wbc-evaluate` scores: a `wbc-train` checkpoint, or an exported ONNX model with its metadata.

Both come back as an `nn.Module` with the engine's `InputTransform` of the model, so that
`predict.predict_labels` scores the shipped file and a checkpoint through the service's own pre- and
post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.engine.contract import ModelMetadata, sha256_file
from app.engine.session import CPU, CUDA, session_options
from app.engine.transform import InputTransform
from model_training.export import best_epoch, load_checkpoint
from model_training.transforms import input_transform, stain_of


@dataclass
class LoadedModel:
    """A model ready for `predict_labels`, with what its checkpoint or metadata says about it."""

    label: str
    path: Path
    kind: str                               # "checkpoint" or "onnx"
    module: nn.Module
    input_size: int
    transform: InputTransform
    train_config: dict[str, Any]
    val_names: list[str] | None
    info: dict[str, Any]                    # architecture, parameters, epoch, sha256


class OnnxModel(nn.Module):
    """An exported model run by onnxruntime behind `nn.Module`'s call, so that it is scored through
    the same `predict_labels` as a checkpoint.

    Args:
        path: the `.onnx` file.
        metadata: its `model.json`.
        providers: onnxruntime execution providers, in order of preference.
    """

    def __init__(self, path: Path, metadata: ModelMetadata, providers: Sequence[str]) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options(), providers=list(providers))
        self.input_name = metadata.input.name
        self.output_name = metadata.output.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(N, C, H, W)` for a normalised image batch `(N, 3, H, W)`."""
        feed = {self.input_name: x.detach().cpu().numpy().astype(np.float32)}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])


def resolve_path(path: Path) -> Path:
    """A run folder means its `best.pt` (or the `model.onnx` of an export folder)."""
    if path.is_dir():
        for name in ("best.pt", "model.onnx"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path}: no best.pt or model.onnx in this folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or ONNX file")
    return path


def default_label(path: Path) -> str:
    """`runs/unet-s0/best.pt` → `unet-s0`, `runs/unet-s0/last.pt` → `unet-s0-last`, else the stem."""
    if path.stem in ("best", "model"):
        return path.parent.resolve().name
    if path.stem == "last":
        return f"{path.parent.resolve().name}-last"
    return path.stem


def load_onnx_model(path: Path, device: str) -> tuple[nn.Module, ModelMetadata]:
    """An `OnnxModel` and its metadata (`<stem>.json` or `model.json` beside it, as the service finds it).

    Raises:
        ModelLoadError: when the metadata is missing or invalid.
    """
    import onnxruntime as ort

    meta = ModelMetadata.for_model(path)
    providers = [CPU]
    if device != "cpu" and CUDA in ort.get_available_providers():
        providers.insert(0, CUDA)
    return OnnxModel(path, meta, providers), meta


def load_model(spec: str, device: torch.device) -> LoadedModel:
    """Load one `[LABEL=]PATH` argument: a checkpoint, a run folder, or an ONNX file with model.json.

    Args:
        spec: `PATH` or `LABEL=PATH`; without a label, `default_label` names it.
        device: where a checkpoint's model runs (an ONNX model uses onnxruntime's CUDA provider when
            this is not the CPU and the provider exists).

    Raises:
        FileNotFoundError: for a missing file, or an ONNX file without its metadata.
    """
    label, _, raw = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    path = resolve_path(Path(raw))
    sha = sha256_file(path)
    if path.suffix == ".onnx":
        module, meta = load_onnx_model(path, device.type)
        train_cfg = meta.training
        info = {"architecture": meta.architecture, "parameters": meta.parameters,
                "epoch": train_cfg.get("best_epoch"), "sha256": sha}
        return LoadedModel(label or default_label(path), path, "onnx", module, int(meta.input.size[0]),
                           InputTransform.from_metadata(meta), train_cfg, train_cfg.get("val_names"), info)
    model, state = load_checkpoint(path)
    cfg = state["config"]
    info = {"architecture": cfg["model"], "parameters": state.get("parameters"),
            "epoch": best_epoch(state), "sha256": sha}
    size = int(cfg["input_size"])
    return LoadedModel(label or default_label(path), path, "checkpoint", model.to(device), size,
                       input_transform(size, stain_of(cfg)), cfg, state.get("val_names"), info)
