"""Load what `wbc-evaluate` scores: a `wbc-train` checkpoint, or an exported ONNX model with its metadata.

Both come back as an `nn.Module`, so that `predict.predict_labels` scores the shipped file through
exactly the pre- and post-processing it applies to a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_training.export import load_checkpoint, sha256_file
from model_training.transforms import MEAN, STD


@dataclass
class LoadedModel:
    """A model ready for `predict_labels`, with what its checkpoint or metadata says about it."""

    label: str
    path: Path
    kind: str                               # "checkpoint" or "onnx"
    module: nn.Module
    input_size: int
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

    def __init__(self, path: Path, metadata: dict[str, Any], providers: Sequence[str]) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.input_name = metadata["input"]["name"]
        self.output_name = metadata["output"]["name"]

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


def load_onnx_model(path: Path, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """An `OnnxModel` and its metadata, checked to use the preprocessing `predict_labels` applies.

    Raises:
        ValueError: when the metadata's normalisation, scale or input shape differ from training's.
    """
    meta_path = next((p for p in (path.with_suffix(".json"), path.with_name("model.json")) if p.exists()),
                     None)
    if meta_path is None:
        raise FileNotFoundError(f"{path}: no {path.with_suffix('.json').name} or model.json beside it")
    meta = json.loads(meta_path.read_text())
    norm, size = meta["normalization"], meta["input"]["size"]
    if (not np.allclose(norm["mean"], MEAN) or not np.allclose(norm["std"], STD)
            or not np.isclose(norm["scale"], 1 / 255) or size[0] != size[1]):
        raise ValueError(f"{meta_path}: preprocessing differs from training's; it cannot be scored here")
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
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
        train_cfg = meta.get("training", {})
        info = {"architecture": meta.get("architecture"), "parameters": meta.get("parameters"),
                "epoch": train_cfg.get("best_epoch"), "sha256": sha}
        return LoadedModel(label or default_label(path), path, "onnx", module, int(meta["input"]["size"][0]),
                           train_cfg, train_cfg.get("val_names"), info)
    model, state = load_checkpoint(path)
    cfg = state["config"]
    info = {"architecture": cfg["model"], "parameters": state.get("parameters"),
            "epoch": int(state["epoch"]) + 1, "sha256": sha}
    return LoadedModel(label or default_label(path), path, "checkpoint", model.to(device),
                       int(cfg["input_size"]), cfg, state.get("val_names"), info)
