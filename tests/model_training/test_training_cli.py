"""The console scripts: `wbc-train`, `wbc-evaluate` and `wbc-export` run from argv lists."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from model_training import evaluate, train

if TYPE_CHECKING:  # fixture types only; conftest is not importable as a module
    from support.training import TinyExport, TinyRun

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
TINY_ARGS = ["--base-channels", "4", "--depth", "2", "--input-size", "64"]


def test_console_scripts_point_at_main_functions() -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]

    for name in ("wbc-train", "wbc-evaluate", "wbc-export"):
        module, _, attr = scripts[name].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_wbc_train_synthetic_runs_two_epochs_at_the_smoke_rate(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = train.main(["--synthetic", "--model", "attention_unet", *TINY_ARGS, "--out", str(tmp_path)])

    with (tmp_path / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rc == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["epochs_run"] == 2   # after the per-epoch lines
    assert float(rows[0]["lr"]) == pytest.approx(train.SYNTHETIC_LR / 3, rel=1e-2)   # first warm-up epoch
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(("argv", "epochs", "lr"),
                         [(["--synthetic"], train.SYNTHETIC_EPOCHS, train.SYNTHETIC_LR),
                          (["--synthetic", "--epochs", "7", "--lr", "0.01"], 7, 0.01),
                          (["--data", "folder"], train.TrainConfig.epochs, train.TrainConfig.lr)],
                         ids=["synthetic-defaults", "synthetic-explicit", "data-defaults"])
def test_wbc_train_picks_smoke_defaults_only_when_not_given(argv: list[str], epochs: int, lr: float) -> None:
    cfg = train.parse_args(argv)

    assert (cfg.epochs, cfg.lr) == (epochs, lr)


def test_wbc_evaluate_prints_a_table_and_writes_the_report(tiny_run: TinyRun, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = evaluate.main([f"tiny={tiny_run.best}", "--out", str(tmp_path), "--examples", "1",
                        "--group-by", "none"])

    out = capsys.readouterr().out
    assert rc == 0
    assert "tiny" in out and "nucleus" in out and "average" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"report.md", "report.json", "figure.png"}


def test_wbc_evaluate_rejects_an_unknown_split(tiny_run: TinyRun) -> None:
    with pytest.raises(SystemExit):
        evaluate.main([str(tiny_run.best), "--split", "test"])


def test_wbc_export_writes_model_and_metadata(tiny_export: TinyExport) -> None:
    # The session fixture ran `wbc-export`'s main with an argv list (once: the export is the slow part).
    assert tiny_export.returncode == 0
    assert tiny_export.onnx.exists() and (tiny_export.out / "model.json").exists()
    assert tiny_export.stdout.startswith(f"wrote {tiny_export.onnx}")
