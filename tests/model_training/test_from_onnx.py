"""`from_onnx`: a checkpoint rebuilt from an export whose BatchNorms were folded computes what the
ONNX graph computes, carries `save_checkpoint`'s keys, and fine-tunes with `--init … --freeze-bn`, or in
train mode once its BatchNorm statistics are re-estimated (`--batch-statistics`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_training import from_onnx
from model_training.export import export_onnx
from model_training.models import build_model
from model_training.train import TrainConfig, train

#: The keys `train.save_checkpoint` writes.
CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "best", "config", "val_names", "scores", "classes",
                   "parameters"}


def _model_with_trained_statistics() -> nn.Module:
    """A tiny attention U-Net whose BatchNorms hold statistics and affine parameters far from the
    defaults, so that folding them changes every convolution."""
    torch.manual_seed(3)
    model = build_model("attention_unet", base_channels=4, depth=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(n) * 0.5)
                module.running_var.copy_(torch.rand(n) * 2 + 0.2)
                module.weight.copy_(torch.rand(n) + 0.5)
                module.bias.copy_(torch.randn(n) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def folded_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The model above exported by the project's export (which folds the BatchNorms), with a model.json
    holding what `from_onnx` reads."""
    model = _model_with_trained_statistics()
    root = tmp_path_factory.mktemp("folded")
    export_onnx(model, root / "model.onnx", input_size=32)
    cfg = TrainConfig(synthetic=True, model="attention_unet", base_channels=4, depth=2, input_size=32)
    training = {**asdict(cfg), "best_epoch": 3, "val_mean_dice": 0.5, "val_names": ["synthetic/007"]}
    (root / "model.json").write_text(json.dumps({"architecture": "attention_unet", "training": training,
                                                 "classes": ["background", "cytoplasm", "nucleus"]}))
    return model, root / "model.onnx"


def test_the_export_folds_the_batchnorms(folded_export: tuple[nn.Module, Path]) -> None:
    import onnx

    model, path = folded_export
    names = {t.name for t in onnx.load(str(path)).graph.initializer}

    assert not any("running_mean" in n for n in names)
    assert len([n for n in names if n.endswith(".weight_bias")]) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_rebuilt_model_matches_onnxruntime_and_the_original(folded_export: tuple[nn.Module, Path]) -> None:
    original, path = folded_export

    rebuilt, _ = from_onnx.rebuild(path)

    assert from_onnx.parity(rebuilt, path, input_size=32) <= 1e-4
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 40, 36), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x), atol=1e-4, rtol=0)


def test_rebuilt_batchnorms_are_identities_that_carry_the_folded_bias(
        folded_export: tuple[nn.Module, Path]) -> None:
    _, path = folded_export

    rebuilt, _ = from_onnx.rebuild(path)

    bns = [m for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_mean is not None and bn.running_var is not None
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.sqrt(bn.running_var + bn.eps).sub(1).abs().max() < 1e-6
    assert any(float(bn.bias.detach().abs().max()) > 0 for bn in bns)


def test_checkpoint_has_the_training_keys_and_the_recorded_run(folded_export: tuple[nn.Module, Path]) -> None:
    _, path = folded_export

    _, state = from_onnx.rebuild(path)

    assert set(state) == CHECKPOINT_KEYS
    assert state["epoch"] == 2 and state["best"] == 0.5
    assert state["val_names"] == ["synthetic/007"]
    assert state["config"]["model"] == "attention_unet" and state["config"]["input_size"] == 32
    fresh = build_model("attention_unet", base_channels=4, depth=2)
    assert set(state["model"]) == set(fresh.state_dict())
    fresh.load_state_dict(state["model"])   # strict


def test_rebuild_refuses_a_graph_of_another_architecture(folded_export: tuple[nn.Module, Path],
                                                          tmp_path: Path) -> None:
    _, path = folded_export
    meta = json.loads(path.with_name("model.json").read_text())
    meta["architecture"] = meta["training"]["model"] = "unet"
    (tmp_path / "model.json").write_text(json.dumps(meta))

    with pytest.raises(from_onnx.RebuildError):
        from_onnx.rebuild(path, tmp_path / "model.json")


def test_metadata_is_found_as_the_service_finds_it(folded_export: tuple[nn.Module, Path],
                                                  tmp_path: Path) -> None:
    _, path = folded_export
    (tmp_path / "v22.onnx").write_bytes(path.read_bytes())
    (tmp_path / "v22.json").write_text(path.with_name("model.json").read_text())

    _, state = from_onnx.rebuild(tmp_path / "v22.onnx")    # no model.json in tmp_path: v22.json is read

    assert state["val_names"] == ["synthetic/007"]


def test_cli_rebuilds_the_exported_tiny_model_and_it_fine_tunes_with_frozen_batchnorm(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "shipped" / "best.pt"

    rc = from_onnx.main([str(tiny_model_dir / "model.onnx"), str(checkpoint)])

    assert rc == 0 and checkpoint.exists()
    assert "parity max abs diff" in capsys.readouterr().out
    state = torch.load(checkpoint, weights_only=False)
    assert set(state) == CHECKPOINT_KEYS
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    assert state["parameters"] == meta["parameters"]

    cfg = TrainConfig(**{**state["config"], "epochs": 1, "lr": 1e-3, "init": str(checkpoint),
                         "freeze_bn": True, "out": str(tmp_path / "ft"), "threads": 1})
    train(cfg)

    tuned = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    for name, value in state["model"].items():
        if "running_" in name or "num_batches" in name:
            assert torch.equal(tuned[name], value), f"{name} moved with frozen BatchNorm"
    assert any(not torch.equal(tuned[n], state["model"][n]) for n in state["model"] if n.endswith(".weight"))


def _synthetic_inputs(count: int, size: int = 32) -> list[np.ndarray]:
    from model_training.synthetic import make_samples
    from model_training.transforms import input_transform

    transform = input_transform(size)
    return [transform(s.image) for s in make_samples(count, size=48, seed=5)]


def test_reestimated_statistics_keep_the_eval_function_and_close_the_train_mode_gap(
        folded_export: tuple[nn.Module, Path]) -> None:
    _, path = folded_export
    rebuilt, _ = from_onnx.rebuild(path)
    inputs = _synthetic_inputs(16)
    gap_before = from_onnx.train_mode_gap(rebuilt, inputs)

    count = from_onnx.reestimate_batchnorm(rebuilt, inputs)

    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules())
    assert from_onnx.parity(rebuilt, path, input_size=32) <= 1e-4   # eval mode: still the ONNX graph
    assert not rebuilt.training
    bn = next(m for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None and float(bn.running_mean.abs().max()) > 0
    gap_after = from_onnx.train_mode_gap(rebuilt, inputs)
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)


def test_reestimation_refuses_no_inputs(folded_export: tuple[nn.Module, Path]) -> None:
    rebuilt, _ = from_onnx.rebuild(folded_export[1])

    with pytest.raises(ValueError, match="no inputs"):
        from_onnx.reestimate_batchnorm(rebuilt, [])


def test_cli_re_estimated_checkpoint_fine_tunes_in_train_mode(tiny_model_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "shipped.pt"

    rc = from_onnx.main([str(tiny_model_dir / "model.onnx"), str(checkpoint), "--batch-statistics"])

    assert rc == 0
    assert "BatchNorms re-estimated over" in capsys.readouterr().out
    state = torch.load(checkpoint, weights_only=False)
    means = [v for k, v in state["model"].items() if k.endswith("running_mean")]
    assert means and any(float(v.abs().max()) > 0 for v in means)
    cfg = TrainConfig(**{**state["config"], "epochs": 1, "lr": 1e-3, "init": str(checkpoint),
                         "out": str(tmp_path / "ft"), "threads": 1})
    train(cfg)
    tuned = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    moved = [k for k in state["model"]
             if k.endswith("running_mean") and not torch.equal(tuned[k], state["model"][k])]
    assert moved, "train mode updates the re-estimated statistics"
