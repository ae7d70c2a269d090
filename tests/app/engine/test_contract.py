"""The export's `model.json` is exactly what the service's schema expects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.service import TINY_INPUT

from app.engine.contract import ModelMetadata, sha256_file, verify_model_file
from app.engine.errors import ModelLoadError


def test_exported_metadata_validates_against_the_service_schema(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    meta = ModelMetadata.model_validate(raw)
    assert meta.input.size == (TINY_INPUT, TINY_INPUT)
    assert meta.classes == ["background", "cytoplasm", "nucleus"]
    assert meta.sha256 == sha256_file(tiny_model_dir / "model.onnx")
    assert meta.file == "model.onnx"


def test_every_field_the_export_writes_is_known_to_the_schema(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    assert set(raw) <= set(ModelMetadata.model_fields), set(raw) - set(ModelMetadata.model_fields)


def test_model_file_matches_its_recorded_sha256(tiny_model_dir: Path) -> None:
    verify_model_file(tiny_model_dir / "model.onnx", ModelMetadata.load(tiny_model_dir / "model.json"))


@pytest.mark.parametrize(("change", "reason"), [
    ({"classes": ["background", "nucleus"]}, "classes"),
    ({"sha256": "xyz"}, "sha256"),
    ({"schema_version": 3}, "schema_version"),
    ({"stain": {"mean": [70, 10, 5], "std": [15, 10, 10]}}, "schema_version 2"),
    ({"schema_version": 2, "stain": {"mean": [70, 10, 5], "std": [15, float("nan"), 10]}}, "std"),
    ({"normalization": {"scale": 0.0039, "mean": [0, 0, 0], "std": [0, 1, 1]}}, "std"),
], ids=["missing-class", "bad-sha", "future-schema", "stain-in-schema-1", "nan-stain-std", "zero-std"])
def test_invalid_metadata_is_refused_with_the_reason(tiny_model_dir: Path, tmp_path: Path,
                                                     change: dict[str, object], reason: str) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ModelLoadError, match=reason):
        ModelMetadata.load(tmp_path / "model.json")


def test_a_model_file_that_differs_from_its_metadata_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    meta = ModelMetadata.load(tiny_model_dir / "model.json")
    (tmp_path / "model.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        verify_model_file(tmp_path / "model.onnx", meta)
