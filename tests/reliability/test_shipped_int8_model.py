"""The shipped int8 models, where there are: each belongs to the fp32 model beside it (the default in
`weights/`, the earlier versions in `weights/<version>/`), passed its Dice bound, gives the fp32 model's
classes on the CPU that runs the tests (whether or not it has VNNI), and the service serves it with masks
that agree with the fp32 model's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from support.service import png_array, running, upload

from app.api.settings import Settings
from app.engine.contract import ModelMetadata, sha256_file, verify_model_file
from app.engine.session import CPU, INT8_MIN_AGREEMENT, int8_agreement

REPO = Path(__file__).resolve().parents[2]
FP32 = REPO / "weights" / "model.onnx"
INT8 = REPO / "weights" / "model.int8.onnx"
EXAMPLES = sorted((REPO / "examples").glob("*.png"))

pytestmark = pytest.mark.skipif(not (INT8.is_file() and FP32.is_file()),
                                reason="weights/model.int8.onnx is not there (wbc-quantize writes it)")


VERSION_FOLDERS = sorted((REPO / "weights").glob("[0-9]*.[0-9]*.[0-9]*"))
SHIPPED_FOLDERS = [folder for folder in (REPO / "weights", *VERSION_FOLDERS)
                   if (folder / "model.int8.onnx").is_file()]


@pytest.mark.parametrize("folder", SHIPPED_FOLDERS, ids=lambda f: f.relative_to(REPO).as_posix())
def test_int8_model_was_made_from_the_shipped_model_and_passed_its_bound(folder: Path) -> None:
    int8, fp32_path = folder / "model.int8.onnx", folder / "model.onnx"
    meta = json.loads(int8.with_suffix(".json").read_text())
    verify_model_file(int8, ModelMetadata.load(int8.with_suffix(".json")))
    verify_model_file(fp32_path, ModelMetadata.load(folder / "model.json"))
    fp32 = json.loads((folder / "model.json").read_text())
    assert meta["quantization"]["source"]["sha256"] == fp32["sha256"] == sha256_file(fp32_path), \
        f"{fp32_path} changed since the int8 model was made: run wbc-quantize again"
    validation = meta["quantization"]["validation"]
    assert validation["accepted"] is True
    assert all(d["delta"] >= -validation["max_dice_drop"] for d in validation["dice"].values())
    assert meta["version"] == f"{fp32['version']}+int8"


@pytest.mark.parametrize("folder", SHIPPED_FOLDERS, ids=lambda f: f.relative_to(REPO).as_posix())
def test_int8_model_gives_the_fp32_classes_on_this_cpu(folder: Path) -> None:
    meta = ModelMetadata.load(folder / "model.int8.json")
    assert meta.quantization["reduce_range"] is True, "8-bit weights saturate on x86 CPUs without VNNI"
    int8, fp32 = (ort.InferenceSession(str(folder / name), providers=[CPU])
                  for name in ("model.int8.onnx", "model.onnx"))
    assert int8_agreement(int8, fp32, meta) >= INT8_MIN_AGREEMENT, "the engine's start-up check"
    examples = [np.asarray(Image.open(path).convert("RGB")) for path in EXAMPLES]
    assert int8_agreement(int8, fp32, meta, examples) >= 0.99, "every shipped example"


def _masks(settings: Settings) -> dict[str, np.ndarray]:
    with running(settings) as client:
        return {p.name: png_array(client.post("/v1/segment?format=png", files=upload(p.read_bytes(), p.name))
                                  .content) for p in EXAMPLES}


def test_int8_masks_agree_with_the_fp32_masks(settings_for: Callable[..., Settings]) -> None:
    fp32, int8 = _masks(settings_for(model_path=FP32)), _masks(settings_for(model_path=INT8))
    for name, mask in fp32.items():
        for cls in (1, 2):
            a, b = mask == cls, int8[name] == cls
            dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
            assert dice > 0.97, (name, cls, dice)
