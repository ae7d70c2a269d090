"""`--freeze-bn`: BatchNorm running statistics stay as loaded while the rest (affine included) trains;
`--hed` reaches the augmentation and the checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from model_training.losses import DiceCELoss
from model_training.models import build_model
from model_training.train import TrainConfig, freeze_batchnorm, parse_args, train, train_epoch

if TYPE_CHECKING:  # fixture types only
    from support.training import TinyRun


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _one_epoch(freeze_bn: bool) -> tuple[set[str], set[str]]:
    """Train a tiny U-Net for two steps; return the statistics that moved and the BatchNorm affine
    parameters that moved."""
    torch.manual_seed(0)
    model = build_model("unet", base_channels=4, depth=2)
    before = _statistics(model)
    bn_params = {f"{name}.{p}": m for name, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in bn_params}
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (4, 32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with tqdm(total=2, disable=True) as bar:
        train_epoch(model, [(x, y), (x, y)], DiceCELoss(), optimizer, scaler, torch.device("cpu"), None, bar,
                    freeze_bn=freeze_bn)
    after = _statistics(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    affine = {n for n, p in model.named_parameters() if n in start and not torch.equal(start[n], p.detach())}
    return moved, affine


def test_freeze_batchnorm_puts_only_the_batchnorms_in_eval_mode() -> None:
    model = build_model("attention_unet", base_channels=4, depth=2).train()

    count = freeze_batchnorm(model)

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert count == len(bns) > 0
    assert all(not m.training for m in bns)
    assert all(m.training for m in model.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_frozen_epoch_keeps_the_running_statistics_and_trains_the_affine_parameters() -> None:
    frozen_stats, frozen_affine = _one_epoch(freeze_bn=True)
    free_stats, _ = _one_epoch(freeze_bn=False)

    assert frozen_stats == set()
    assert frozen_affine, "BatchNorm weight and bias still train"
    assert free_stats, "without the flag the statistics move"


def test_flags_parse_and_default_off() -> None:
    assert (parse_args([]).freeze_bn, parse_args([]).hed) == (False, 0.0)

    cfg = parse_args(["--data", "folder", "--freeze-bn", "--hed", "0.05"])

    assert cfg.freeze_bn is True and cfg.hed == 0.05


def test_run_with_frozen_batchnorm_and_hed_records_both_and_keeps_the_statistics(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(tiny_config(tmp_path, epochs=1, init=str(tiny_run.best), freeze_bn=True, hed=0.05))

    started = torch.load(tiny_run.best, weights_only=False)
    ended = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ended["config"]["freeze_bn"] is True and ended["config"]["hed"] == 0.05
    stats = [n for n in started["model"] if "running_" in n or "num_batches" in n]
    assert stats
    for name in stats:
        assert torch.equal(ended["model"][name], started["model"][name]), name
