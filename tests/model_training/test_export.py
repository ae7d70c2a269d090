"""`wbc-export`: the ONNX file matches PyTorch and `model.json` describes it."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.engine.contract import DEFAULT_NORMALIZATION
from model_training import CLASS_NAMES
from model_training.export import (
    OPSET,
    PARITY_TOLERANCE,
    ParityError,
    check_parity,
    evaluation_entry,
    load_checkpoint,
    parity_inputs,
)

if TYPE_CHECKING:  # fixture types only; conftest is not importable as a module
    from support.training import TinyExport, TinyRun


def test_export_writes_an_onnx_model_with_dynamic_size_and_batch(tiny_export: TinyExport) -> None:
    session = ort.InferenceSession(str(tiny_export.onnx), providers=["CPUExecutionProvider"])

    logits = session.run(None, {"image": np.zeros((3, 3, 117, 101), np.float32)})[0]

    assert tiny_export.returncode == 0
    assert logits.shape == (3, len(CLASS_NAMES), 117, 101)


def test_export_metadata_describes_the_file_and_its_preprocessing(tiny_export: TinyExport,
                                                                 tiny_run: TinyRun) -> None:
    meta = json.loads((tiny_export.out / "model.json").read_text())

    assert meta["name"] == "wbc-tiny"
    assert meta["architecture"] == "unet"
    assert meta["file"] == "model.onnx" and meta["opset"] == OPSET
    assert meta["sha256"] == hashlib.sha256(tiny_export.onnx.read_bytes()).hexdigest()
    assert meta["input"] == {"name": "image", "size": [64, 64], "channels": 3, "color": "RGB",
                             "layout": "NCHW", "dtype": "float32", "resize": "bilinear"}
    assert meta["output"]["name"] == "logits"
    norm = DEFAULT_NORMALIZATION
    assert meta["normalization"] == {"scale": pytest.approx(1 / 255), "mean": list(norm.mean),
                                     "std": list(norm.std)}
    assert meta["classes"] == list(CLASS_NAMES)
    assert meta["training"]["val_names"] == torch.load(tiny_run.best, weights_only=False)["val_names"]
    assert meta["export"]["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert meta["sha256"][:12] in tiny_export.stdout


def test_export_metadata_records_the_evaluation_of_this_checkpoint(tiny_export: TinyExport) -> None:
    meta = json.loads((tiny_export.out / "model.json").read_text())
    scored = tiny_export.evaluation_report["models"][0]

    assert meta["evaluation"]["sha256"] == scored["sha256"]
    assert meta["evaluation"]["overall"] == scored["overall"]
    assert "per_image" not in meta["evaluation"]


def test_parity_check_fails_when_the_model_differs_from_the_file(tiny_export: TinyExport,
                                                                tiny_run: TinyRun) -> None:
    model, _ = load_checkpoint(tiny_run.best)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias += 0.5

    assert check_parity(model, tiny_export.onnx, parity_inputs(64)) <= PARITY_TOLERANCE
    with pytest.raises(ParityError, match="onnxruntime"):
        check_parity(changed, tiny_export.onnx, parity_inputs(64))


def test_evaluation_entry_picks_the_checkpoint_among_several_models() -> None:
    report = {"created": "t", "models": [{"label": "a", "sha256": "aa", "overall": 1, "per_image": []},
                                         {"label": "b", "sha256": "bb", "overall": 2, "per_image": []}]}

    assert evaluation_entry(report, "bb")["label"] == "b"
    assert "per_image" not in evaluation_entry(report, "bb")
    with pytest.raises(ValueError, match="none is this checkpoint"):
        evaluation_entry(report, "cc")
    assert evaluation_entry({"note": "hand-written"}, "cc") == {"note": "hand-written"}
