"""`wbc-train --stain-norm`: the reference comes from the training images, training batches are
normalised as the engine normalises the network's input, and the checkpoint and its export carry the
reference to evaluation and the service."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.contract import DEFAULT_NORMALIZATION
from app.engine.stain import reference_statistics
from app.engine.transform import InputTransform
from model_training.export import ExportConfig, build_metadata, load_checkpoint
from model_training.loading import load_model
from model_training.train import TrainConfig, load_data, make_batches, train
from model_training.transforms import Augment, normalize, normalize_stain_tensor, to_tensor


@pytest.fixture(scope="module")
def stain_run(tmp_path_factory: pytest.TempPathFactory,
              tiny_config: Callable[..., TrainConfig]) -> tuple[Path, TrainConfig]:
    out = tmp_path_factory.mktemp("stain-run")
    cfg = tiny_config(out, epochs=1, stain_norm=True)
    train(cfg)
    return out, cfg


def test_the_reference_is_taken_from_the_training_images_only(stain_run: tuple[Path, TrainConfig]) -> None:
    out, cfg = stain_run
    saved = torch.load(out / "best.pt", weights_only=False)["config"]["stain_reference"]
    train_set, val_set = load_data(TrainConfig(**{**cfg.__dict__, "stain_reference": None}))
    assert saved == reference_statistics(s.image for s in train_set).model_dump()
    assert saved != reference_statistics(s.image for s in val_set).model_dump()


def test_training_batches_are_normalised_as_the_engine_normalises_inputs(
        stain_run: tuple[Path, TrainConfig]) -> None:
    out, _ = stain_run
    loaded = load_model(str(out / "best.pt"), torch.device("cpu"))
    transform: InputTransform = loaded.transform
    assert transform.stain is not None
    image = np.asarray(Image.fromarray(load_data(TrainConfig(synthetic=True))[1][0].image).resize(
        transform.size[::-1]))  # already at the model's size: the engine's resize is the identity
    engine = transform(image)
    training = normalize_stain_tensor(to_tensor(image), transform.stain)
    training = normalize(training)
    assert np.allclose(engine, training.numpy(), atol=1e-4)
    plain = InputTransform.create(transform.size, DEFAULT_NORMALIZATION)(image)
    assert not np.allclose(engine, plain, atol=0.05)


def test_the_export_writes_the_reference_into_model_json(stain_run: tuple[Path, TrainConfig],
                                                         tmp_path: Path) -> None:
    out, _ = stain_run
    model, state = load_checkpoint(out / "best.pt")
    onnx_stand_in = tmp_path / "model.onnx"
    onnx_stand_in.write_bytes(b"not checked here")
    meta = build_metadata(ExportConfig(str(out / "best.pt")), state, model, onnx_stand_in, 0.0)
    assert meta.stain is not None
    assert meta.stain.model_dump() == state["config"]["stain_reference"]
    assert InputTransform.from_metadata(meta).stain == meta.stain


def test_make_batches_normalises_each_augmented_image_with_the_engines_function(
        stain_run: tuple[Path, TrainConfig]) -> None:
    out, cfg = stain_run
    stain = load_model(str(out / "best.pt"), torch.device("cpu")).transform.stain
    assert stain is not None
    samples = load_data(TrainConfig(synthetic=True))[0][:4]

    def batch(with_stain: bool) -> torch.Tensor:
        augment = Augment(cfg.input_size, generator=torch.Generator().manual_seed(7))
        return make_batches(samples, augment, 4, random.Random(0), stain if with_stain else None)[0][0]

    plain, stained = batch(False), batch(True)
    mean = torch.tensor(DEFAULT_NORMALIZATION.mean).view(3, 1, 1)
    std = torch.tensor(DEFAULT_NORMALIZATION.std).view(3, 1, 1)
    augmented = plain * std + mean  # the same augmented images, in [0, 1]
    expected = torch.stack([normalize(normalize_stain_tensor(x, stain)) for x in augmented])
    assert torch.allclose(stained, expected, atol=1e-4)
    assert not torch.allclose(stained, plain, atol=0.05)


def test_fine_tuning_keeps_the_checkpoints_reference_and_needs_stain_norm(
        stain_run: tuple[Path, TrainConfig], tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    out, _ = stain_run
    inherited = torch.load(out / "best.pt", weights_only=False)["config"]["stain_reference"]
    # Other training images (another split seed of the generated data) would give another reference.
    other = tiny_config(tmp_path / "a", epochs=1, stain_norm=True, split_seed=5, init=str(out / "best.pt"))
    train(other)
    kept = torch.load(tmp_path / "a" / "best.pt", weights_only=False)["config"]["stain_reference"]
    assert kept == inherited
    fresh = load_data(TrainConfig(synthetic=True, split_seed=5))[0]
    assert reference_statistics(s.image for s in fresh).model_dump() != inherited
    with pytest.raises(ValueError, match="--stain-norm"):
        train(tiny_config(tmp_path / "b", epochs=1, init=str(out / "best.pt")))
