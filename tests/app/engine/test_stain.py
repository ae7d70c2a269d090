"""Stain normalisation (Reinhard, CIELAB): an input moves to the reference's statistics, a stain change
is undone, and a model's metadata switches it on in the engine's transform."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from support.service import copy_model, sample_rgb

from app.engine.contract import DEFAULT_NORMALIZATION, ModelMetadata, StainNormalization
from app.engine.stain import lab_statistics, normalize_stain, reference_statistics
from app.engine.transform import InputTransform

REFERENCE = StainNormalization(mean=(70.0, 12.0, -8.0), std=(14.0, 9.0, 7.0))


def restain(image: np.ndarray, gain: tuple[float, float, float],
            shift: tuple[float, float, float]) -> np.ndarray:
    """`image` as another lab's stain might show it: each CIELAB channel scaled and shifted."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lab = (lab - lab.mean((0, 1))) * np.float32(gain) + lab.mean((0, 1)) + np.float32(shift)
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255, 0, 255)


def test_an_image_takes_the_references_statistics() -> None:
    image = sample_rgb(120, 100, seed=3)
    mean, std = lab_statistics(normalize_stain(image, REFERENCE))
    assert np.allclose(mean, REFERENCE.mean, atol=1.5), mean
    assert np.allclose(std, REFERENCE.std, rtol=0.1), std
    before, _ = lab_statistics(image)
    assert not np.allclose(before, REFERENCE.mean, atol=5)


def test_another_labs_stain_comes_back_to_the_same_image() -> None:
    image = sample_rgb(120, 100, seed=4)
    other = restain(image, gain=(0.8, 1.3, 0.7), shift=(6.0, -5.0, 8.0))
    before = np.abs(other - image).mean()
    assert before > 8  # a visible change of stain
    a, b = normalize_stain(image, REFERENCE), normalize_stain(other, REFERENCE)
    after = np.abs(a - b).mean()  # what is left: pixels the restaining clipped at white or black
    assert after < before / 3, (before, after)


def test_a_flat_image_is_shifted_not_blown_up() -> None:
    grey = np.full((16, 16, 3), 128, np.uint8)
    out = normalize_stain(grey, REFERENCE)
    assert np.isfinite(out).all() and out.std(axis=(0, 1)).max() < 1e-3


def test_the_reference_is_the_mean_of_each_images_statistics() -> None:
    images = [sample_rgb(60, 50, seed=1), sample_rgb(200, 150, seed=2)]
    reference = reference_statistics(images)
    stats = [lab_statistics(image) for image in images]
    assert np.allclose(reference.mean, np.mean([m for m, _ in stats], axis=0))
    assert np.allclose(reference.std, np.mean([s for _, s in stats], axis=0))
    with pytest.raises(ValueError, match="no images"):
        reference_statistics([])


def test_metadata_switches_stain_normalisation_on_in_the_transform(tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    model_path = copy_model(tiny_model_dir, tmp_path)
    plain = ModelMetadata.for_model(model_path)
    assert plain.stain is None  # a model.json without the field: no stain normalisation
    raw = json.loads(plain.model_dump_json())
    raw["stain"], raw["schema_version"] = REFERENCE.model_dump(), 2
    meta = ModelMetadata.model_validate(raw)
    assert meta.stain == REFERENCE
    image = sample_rgb(90, 70, seed=5)
    with_stain = InputTransform.from_metadata(meta)
    resized = with_stain.resize(Image.fromarray(image)).transpose(1, 2, 0)
    expected = InputTransform.create(meta.input.size, DEFAULT_NORMALIZATION).normalize(
        normalize_stain(resized, REFERENCE).transpose(2, 0, 1))
    assert np.allclose(with_stain(image), expected, atol=1e-5)
    assert not np.allclose(InputTransform.from_metadata(plain)(image), expected, atol=0.05)


def test_a_reference_without_spread_is_refused() -> None:
    with pytest.raises(ValueError, match="std must be positive"):
        StainNormalization(mean=(50.0, 0.0, 0.0), std=(10.0, 0.0, 5.0))


def test_a_grey_image_is_not_coloured_by_noise_and_the_input_is_left_alone() -> None:
    ramp = np.repeat(np.linspace(20, 235, 96, dtype=np.float32)[None, :, None], 64, axis=0)
    grey = np.repeat(ramp, 3, axis=2)  # R = G = B: a and b spread only by rounding
    before = grey.copy()
    out = normalize_stain(grey, REFERENCE)
    assert np.array_equal(grey, before)
    lab = cv2.cvtColor(out / 255, cv2.COLOR_RGB2LAB)
    assert lab[..., 1].std() < 1.0 and lab[..., 2].std() < 1.0, (lab[..., 1].std(), lab[..., 2].std())
