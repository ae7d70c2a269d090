"""Fixtures of the training tests: tiny generated data, one tiny training run and one export per session."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.training import TinyExport, TinyRun

from model_training import evaluate, export
from model_training.train import SYNTHETIC_LR, TrainConfig, train

#: The smallest models worth testing: fast on a busy CPU, still every block of the real ones.
TINY: dict[str, Any] = {"base_channels": 4, "depth": 2}


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # The test machines share two cores with training jobs; more threads only contend for them.
    torch.set_num_threads(1)


def _tiny_config(out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {"synthetic": True, "model": "unet", **TINY, "input_size": 64, "epochs": 2,
                              "lr": SYNTHETIC_LR, "batch_size": 8, "out": str(out)}
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., TrainConfig]:
    """`tiny_config(out, **overrides)`: two synthetic epochs of a tiny U-Net at 64 px, as `--synthetic`
    runs them."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Two synthetic epochs of a tiny U-Net (shared: the training tests read its log and checkpoints)."""
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = _tiny_config(out)
    return TinyRun(out, cfg, train(cfg))


@pytest.fixture(scope="session")
def tiny_export(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    """The tiny run evaluated, then exported by `wbc-export`'s main with that evaluation (once: the
    dynamo export takes most of the suite's time)."""
    eval_dir = tmp_path_factory.mktemp("tiny-eval")
    report = evaluate.evaluate(evaluate.EvaluateConfig(models=[str(tiny_run.best)], examples=0,
                                                       out=str(eval_dir)))
    out = tmp_path_factory.mktemp("tiny-export")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = export.main([str(tiny_run.best), "--out-dir", str(out), "--name", "wbc-tiny",
                          "--evaluation", str(eval_dir / "report.json")])
    return TinyExport(out, rc, stdout.getvalue(), report)
