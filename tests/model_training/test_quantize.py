"""`wbc-quantize`: the int8 model it writes, the metadata the service reads, and its acceptance rule."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.training import TinyExport

from app.api.main import create_app
from app.api.settings import Settings
from app.engine.contract import ModelMetadata, metadata_path, verify_model_file
from model_training.quantize import QuantizeConfig, QuantizeResult, dice_comparison, main, quantize


def _config(tiny_export: TinyExport, out: Path, **overrides: Any) -> QuantizeConfig:
    values: dict[str, Any] = {"model": str(tiny_export.onnx), "out": str(out), "calibration_images": 8,
                              "batch_sizes": (1,), "speed_rounds": 1, "threads": 1}
    return QuantizeConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def accepted(tiny_export: TinyExport, tmp_path_factory: pytest.TempPathFactory) -> QuantizeResult:
    """The tiny model quantized under a bound that any int8 model meets."""
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return quantize(_config(tiny_export, out, max_dice_drop=1.0))


def test_int8_model_has_quantized_convolutions_and_keeps_float_io(accepted: QuantizeResult) -> None:
    assert accepted.accepted and accepted.path is not None and accepted.path.is_file()
    model = onnx.load(str(accepted.path))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= ops["Conv"], "every convolution's weight is int8"
    largest = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int16)).max()) for t in int8_weights)
    assert largest <= 64, "7-bit weights: the products of x86 CPUs without VNNI cannot saturate"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_metadata_records_calibration_scores_and_speed(accepted: QuantizeResult,
                                                            tiny_export: TinyExport) -> None:
    assert accepted.path is not None
    meta = json.loads(accepted.path.with_suffix(".json").read_text())
    fp32 = json.loads((tiny_export.out / "model.json").read_text())
    assert meta["file"] == "model.int8.onnx" and meta["version"] == f"{fp32['version']}+int8"
    q = meta["quantization"]
    assert q["source"]["sha256"] == fp32["sha256"]
    assert q["quant_format"] == "qdq" and q["per_channel"] is True and q["activation_type"] == "uint8"
    assert q["reduce_range"] is True
    assert q["calibration"]["count"] == 8 == len(q["calibration"]["images"])
    assert not set(q["calibration"]["images"]) & set(fp32["training"]["val_names"]), \
        "calibration images come from the training side of the split only"
    assert set(q["validation"]["dice"]) == {"nucleus", "cytoplasm", "cell"}
    assert q["validation"]["image_count"] == meta["evaluation"]["image_count"] > 0
    assert q["speed_cpu"]["batch_1"]["int8"] > 0


def test_service_serves_the_int8_model_found_by_its_path_alone(accepted: QuantizeResult) -> None:
    assert accepted.path is not None
    settings = Settings(model_path=accepted.path, intra_op_threads=1, cpu_workers=1, log_format="text")
    assert metadata_path(accepted.path) == accepted.path.with_suffix(".json")
    verify_model_file(accepted.path, ModelMetadata.for_model(accepted.path))
    png = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(png, format="PNG")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/health/ready")
        for _ in range(600):  # the model loads in the background
            if ready.status_code == 200:
                break
            time.sleep(0.05)
            ready = client.get("/health/ready")
        assert ready.json()["version"].endswith("+int8")
        response = client.post("/v1/segment", files={"file": ("a.png", png.getvalue())})
    assert response.status_code == 200, response.text
    assert response.json()["width"] == 50 and response.json()["model"]["version"].endswith("+int8")


def test_a_rejected_model_is_not_written_and_the_command_fails(tiny_export: TinyExport, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.int8.onnx"
    # A negative bound asks the int8 model to beat fp32 on every region by more than any Dice allows.
    rc = main([str(tiny_export.onnx), "--out", str(out), "--calibration-images", "4", "--batch-sizes", "1",
               "--speed-rounds", "1", "--threads", "1", "--max-dice-drop", "-2"])
    assert rc == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert "rejected" in capsys.readouterr().out


def _entry(dice: dict[str, list[float]]) -> dict[str, Any]:
    count = len(next(iter(dice.values())))
    rows = [{"scores": {region: {"dice": values[i]} for region, values in dice.items()}}
            for i in range(count)]
    return {"split": "val", "image_count": count, "per_image": rows}


@pytest.mark.parametrize(("cytoplasm_int8", "accepted"), [(0.898, True), (0.896, False)],
                         ids=["drop-0.002-accepted", "drop-0.004-rejected"])
def test_one_region_over_the_bound_rejects(cytoplasm_int8: float, accepted: bool) -> None:
    fp32 = _entry({"nucleus": [0.96, 0.96], "cytoplasm": [0.9, 0.9], "cell": [0.97, 0.97]})
    int8 = _entry({"nucleus": [0.97, 0.97], "cytoplasm": [cytoplasm_int8] * 2, "cell": [0.97, 0.97]})
    result = dice_comparison(fp32, int8, 0.003)
    assert result["accepted"] is accepted
    assert result["dice"]["cytoplasm"]["delta"] == pytest.approx(cytoplasm_int8 - 0.9)
