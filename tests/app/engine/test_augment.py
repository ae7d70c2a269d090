"""Test-time augmentation: runs mapped back to the input's orientation and averaged, all symmetries of a
batch in one stacked run; chosen per provider by the engine and reported by the service."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.service import copy_model, png_array, running, upload

from app.api.settings import Settings
from app.engine import Engine, ModelConfig, Options, Upload, session
from app.engine.augment import augmented, check_mode, symmetries
from app.engine.contract import ModelMetadata
from app.engine.errors import ModelLoadError
from app.engine.session import Model

WEIGHTS = np.array([[0.5, -1.0, 0.2], [-0.3, 0.8, 0.1], [1.2, 0.4, -0.7]], np.float32)


def per_pixel(images: np.ndarray) -> tuple[np.ndarray, float]:
    """A model that looks at each pixel alone: every symmetry of the input commutes with it."""
    return np.einsum("ck,nkhw->nchw", WEIGHTS, images), 2.0


@pytest.mark.parametrize("mode", ["mirror", "dihedral"])
def test_every_run_is_mapped_back_before_averaging(mode: str) -> None:
    images = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)
    logits, run_ms = augmented(per_pixel, mode)(images)  # type: ignore[arg-type]
    np.testing.assert_allclose(logits, per_pixel(images)[0], atol=1e-5)
    assert run_ms == 2.0, "one stacked run"


def test_the_average_is_over_the_symmetries() -> None:
    """A model that favours the left side of its input gives, mirrored and averaged, an answer that is the
    same on both sides, and under all eight symmetries one that is also the same when transposed."""
    ramp = np.linspace(-3, 3, 10, dtype=np.float32)

    def leftish(images: np.ndarray) -> tuple[np.ndarray, float]:
        logits = np.zeros((len(images), 3, 10, 10), np.float32)
        logits[:, 1] = -ramp[None, None, :]
        logits[:, 2] = np.linspace(0, 1, 10, dtype=np.float32)[None, :, None]
        return logits, 0.0

    images = np.zeros((1, 3, 10, 10), np.float32)
    plain = augmented(leftish, "none")(images)[0]
    assert not np.allclose(plain, plain[..., ::-1]), "the model itself is not symmetric"
    mirrored = augmented(leftish, "mirror")(images)[0]
    np.testing.assert_allclose(mirrored, mirrored[..., ::-1], atol=1e-5)
    np.testing.assert_allclose(mirrored, mirrored[..., ::-1, :], atol=1e-5)
    dihedral = augmented(leftish, "dihedral")(images)[0]
    np.testing.assert_allclose(dihedral, dihedral.swapaxes(2, 3), atol=1e-5)


def test_modes_and_their_limits() -> None:
    assert [len(symmetries(m)) for m in ("none", "mirror", "dihedral")] == [1, 4, 8]  # type: ignore[arg-type]
    check_mode("dihedral", (224, 224))
    check_mode("mirror", (160, 224))
    with pytest.raises(ValueError, match="square"):
        check_mode("dihedral", (160, 224))
    with pytest.raises(ValueError, match="one of"):
        check_mode("rotate", (224, 224))  # type: ignore[arg-type]


def _runs(model: Model, data: bytes) -> list[int]:
    """The batch size of every model run `Engine.segment` makes for one file."""
    engine = Engine(model, 10_000_000)
    sizes: list[int] = []

    def infer(images: np.ndarray) -> tuple[np.ndarray, float]:
        sizes.append(len(images))
        return engine.infer(images)

    result = engine.segment(Upload("a.png", data), Options(), infer=infer)
    assert result.cells is not None  # type: ignore[union-attr]
    return sizes


def test_the_engine_runs_each_window_batch_with_all_its_symmetries_stacked(tiny_model_dir: Path,
                                                                           png_bytes: bytes) -> None:
    runs = {}
    for mode in ("none", "mirror", "dihedral"):
        model = Model.open(ModelConfig(tiny_model_dir / "model.onnx", device="cpu", warmup_runs=0,
                                       tta=mode))  # type: ignore[arg-type]
        assert model.tta == mode
        runs[mode] = _runs(model, png_bytes)
    assert runs["none"]
    assert runs["mirror"] == [4 * n for n in runs["none"]]
    assert runs["dihedral"] == [8 * n for n in runs["none"]]


@pytest.mark.parametrize(("setting", "provider", "square", "expected"), [
    ("auto", session.CUDA, True, "dihedral"), ("auto", session.CUDA, False, "mirror"),
    ("auto", session.CPU, True, "none"), ("mirror", session.CPU, True, "mirror"),
    ("none", session.CUDA, True, "none"),
])
def test_auto_follows_the_provider_and_the_input_shape(tiny_model_dir: Path, setting: str, provider: str,
                                                        square: bool, expected: str) -> None:
    meta = ModelMetadata.load(tiny_model_dir / "model.json")
    height, width = meta.input.size
    shaped = meta.model_copy(update={"input": meta.input.model_copy(
        update={"size": [height, width if square else 2 * width]})})
    assert session._tta_mode(setting, provider, shaped) == expected


def test_auto_is_none_on_the_cpu_and_a_bad_mode_for_the_model_keeps_it_from_loading(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    assert Model.open(ModelConfig(tiny_model_dir / "model.onnx", device="cpu", warmup_runs=0)).tta == "none"
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    height, width = meta["input"]["size"]
    wide = copy_model(tiny_model_dir, tmp_path / "wide", input={**meta["input"], "size": [height, 2 * width]})
    with pytest.raises(ModelLoadError, match="square"):
        Model.open(ModelConfig(wide, device="cpu", warmup_runs=0, tta="dihedral"))


def test_the_service_applies_and_reports_its_augmentation(settings_for: Callable[..., Settings],
                                                          png_bytes: bytes) -> None:
    images = {}  # windows the model ran on
    for mode in ("none", "dihedral"):
        with running(settings_for(tta=mode, warmup_runs=0)) as client:
            assert client.get("/v1/model").json()["tta"] == mode
            assert client.post("/v1/segment", files=upload(png_bytes, "a.png")).json()["model"]["tta"] == mode
            mask = png_array(client.post("/v1/segment?format=png", files=upload(png_bytes, "a.png")).content)
            assert mask.ndim == 2 and mask.max() <= 2
            metrics = client.get("/metrics").text
            found = re.search(r"^wbc_inference_batch_size_sum (\S+)$", metrics, re.MULTILINE)
            assert found
            images[mode] = float(found.group(1))
    assert images["dihedral"] == 8 * images["none"] > 0
