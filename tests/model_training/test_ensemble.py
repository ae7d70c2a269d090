"""`model_training.ensemble`: several checkpoints as one model whose logits are their mean, exported as
one ONNX graph that the engine runs like any model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from model_training import ensemble, export, from_onnx
from model_training.loading import load_model
from model_training.train import TrainConfig, train

if TYPE_CHECKING:  # fixture types only
    from support.training import TinyRun


@pytest.fixture(scope="module")
def second_run(tiny_config: Callable[..., TrainConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny run on the same data and split, from another seed: a second member."""
    out = tmp_path_factory.mktemp("tiny-run-seed1")
    train(tiny_config(out, seed=1))
    return out / "best.pt"


@pytest.fixture(scope="module")
def pair(tiny_run: TinyRun, second_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.pt"
    assert ensemble.main([str(tiny_run.best), str(second_run), "--out", str(path)]) == 0
    return path


def test_ensemble_logits_are_the_mean_of_its_members(tiny_run: TinyRun, second_run: Path, pair: Path) -> None:
    model, state = export.load_checkpoint(pair)
    first, _ = export.load_checkpoint(tiny_run.best)
    second, _ = export.load_checkpoint(second_run)
    x = torch.randn(2, 3, 64, 48)

    with torch.no_grad():
        got, a, b = model(x), first(x), second(x)

    assert not torch.allclose(a, b), "two seeds, two different members"
    torch.testing.assert_close(got, (a + b) / 2)
    assert state["parameters"] == 2 * export.count_parameters(first)


def test_ensemble_checkpoint_records_each_member(tiny_run: TinyRun, second_run: Path, pair: Path) -> None:
    state = torch.load(pair, weights_only=False)
    members = state["config"]["ensemble"]

    assert state["config"]["model"] == "ensemble" and state["epoch"] == -1
    assert [m["seed"] for m in members] == [0, 1]
    assert members[0]["checkpoint_sha256"] == export.sha256_file(tiny_run.best)
    assert members[1]["checkpoint_sha256"] == export.sha256_file(second_run)
    assert state["val_names"] == torch.load(tiny_run.best, weights_only=False)["val_names"]
    loaded = load_model(f"ens={pair}", torch.device("cpu"))
    assert loaded.info["architecture"] == "ensemble" and loaded.info["epoch"] is None


def test_ensemble_refuses_members_that_see_another_input(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "larger", epochs=1, input_size=96))

    with pytest.raises(ValueError, match="input_size 96"):
        ensemble.combine([str(tiny_run.best), str(tmp_path / "larger" / "best.pt")])
    with pytest.raises(ValueError, match="at least two"):
        ensemble.combine([str(tiny_run.best)])


def test_ensemble_refuses_members_validated_on_other_images(
        tiny_run: TinyRun, tmp_path: Path) -> None:
    state = torch.load(tiny_run.best, weights_only=False)
    state["val_names"] = state["val_names"][1:]
    torch.save(state, tmp_path / "other.pt")

    with pytest.raises(ValueError, match="other images"):
        ensemble.combine([str(tiny_run.best), str(tmp_path / "other.pt")])


def test_ensemble_refuses_another_stain_reference(tiny_run: TinyRun, tmp_path: Path) -> None:
    reference = {"method": "reinhard", "space": "CIELAB", "mean": [70.0, 5.0, 10.0],
                 "std": [20.0, 10.0, 10.0]}
    for name, mean in (("a", reference["mean"]), ("b", [70.0, 5.0, 11.0])):
        state = torch.load(tiny_run.best, weights_only=False)
        state["config"] = {**state["config"], "stain_norm": True,
                           "stain_reference": {**reference, "mean": mean}}
        torch.save(state, tmp_path / f"{name}.pt")

    with pytest.raises(ValueError, match="stain reference"):
        ensemble.combine([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert ensemble.combine([str(tmp_path / "a.pt"), str(tmp_path / "a.pt")])["config"]["stain_norm"]


def test_ensemble_exports_as_one_graph_with_parity(pair: Path, tmp_path: Path) -> None:
    meta = export.export(export.ExportConfig(checkpoint=str(pair), out_dir=str(tmp_path), version="9.9.9"))

    written = json.loads((tmp_path / "model.json").read_text())
    assert meta.architecture == "ensemble" and written["architecture"] == "ensemble"
    assert len(written["training"]["ensemble"]) == 2
    assert "best_epoch" not in written["training"], "no one epoch describes an ensemble"
    assert written["export"]["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    loaded = load_model(str(tmp_path / "model.onnx"), torch.device("cpu"))
    model, _ = export.load_checkpoint(pair)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        onnx_logits, torch_logits = loaded.module(torch.from_numpy(x)), model(torch.from_numpy(x))
    np.testing.assert_allclose(onnx_logits.numpy(), torch_logits.numpy(), atol=export.PARITY_TOLERANCE)
    with pytest.raises(from_onnx.RebuildError, match="ensemble"):
        from_onnx.rebuild(tmp_path / "model.onnx")


def test_a_member_is_rebuilt_from_the_ensemble_export(tiny_run: TinyRun, second_run: Path, pair: Path,
                                                      tmp_path: Path) -> None:
    export.export(export.ExportConfig(checkpoint=str(pair), out_dir=str(tmp_path), version="9.9.9"))
    original, original_state = export.load_checkpoint(second_run)

    member, state = from_onnx.rebuild(tmp_path / "model.onnx", member=1)

    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(member(x), original(x), atol=export.PARITY_TOLERANCE, rtol=0)
    assert state["config"]["seed"] == 1 and state["config"]["model"] == original_state["config"]["model"]
    assert state["epoch"] == original_state["epoch"] and state["scores"] == {}
    assert state["parameters"] == export.count_parameters(original)
    with pytest.raises(from_onnx.RebuildError, match="members 0 to 1"):
        from_onnx.rebuild(tmp_path / "model.onnx", member=2)
    single = {"architecture": "attention_unet", "training": state["config"]}
    with pytest.raises(from_onnx.RebuildError, match="not an ensemble"):
        from_onnx.train_config_from_metadata(single, member=0)


def test_every_training_setting_is_recorded_per_member_or_said_not_to_be() -> None:
    """A new `wbc-train` setting must be placed: in model.json's per-member record or, knowingly, not."""
    settings = {f.name for f in dataclasses.fields(TrainConfig)}
    assert settings == set(ensemble.MEMBER_KEYS) | set(ensemble.NOT_PER_MEMBER)
    assert not set(ensemble.MEMBER_KEYS) & set(ensemble.NOT_PER_MEMBER)
