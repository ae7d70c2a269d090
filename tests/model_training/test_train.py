"""`train`: a short synthetic run learns, checkpoints and logs; a resumed run continues where it stopped."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from model_training.train import LOG_FIELDS, TrainConfig, load_data, lr_factor, open_log, train

if TYPE_CHECKING:  # fixture types only
    from support.training import TinyRun


def _log(folder: Path) -> list[dict[str, str]]:
    with (folder / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_two_epoch_synthetic_run_lowers_the_loss(tiny_run: TinyRun) -> None:
    rows = _log(tiny_run.out)

    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])


def test_training_log_has_its_columns_and_the_scheduled_rates(tiny_run: TinyRun) -> None:
    with (tiny_run.out / "log.csv").open(newline="") as f:
        header = next(csv.reader(f))
    rows = _log(tiny_run.out)
    cfg = tiny_run.config

    assert tuple(header) == LOG_FIELDS
    expected_lr = [cfg.lr * lr_factor(epoch, cfg) for epoch in (0, 1)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected_lr, rel=1e-2)
    assert sum(int(r["best"]) for r in rows) >= 1
    assert all(0.0 <= float(r["val_mean_dice"]) <= 1.0 for r in rows)


def test_training_writes_checkpoints_that_record_the_run(tiny_run: TinyRun) -> None:
    best = torch.load(tiny_run.out / "best.pt", weights_only=False)
    last = torch.load(tiny_run.out / "last.pt", weights_only=False)
    _, val = load_data(tiny_run.config)

    assert last["epoch"] == 1
    assert best["epoch"] + 1 == tiny_run.result["best_epoch"]
    assert best["best"] == pytest.approx(tiny_run.result["best_mean_dice"])
    assert best["config"]["model"] == "unet" and best["config"]["base_channels"] == 4
    assert best["val_names"] == [f"{s.source}/{s.name}" for s in val]
    assert (tiny_run.out / "config.json").exists()


def test_resume_continues_the_epoch_count_as_an_uninterrupted_run(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(tiny_config(tmp_path, epochs=1))

    result = train(tiny_config(tmp_path, epochs=2, resume=str(tmp_path / "last.pt")))

    rows, uninterrupted = _log(tmp_path), _log(tiny_run.out)
    assert result["epochs_run"] == 1
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1
    # Same batches, same augmentation, same optimiser state: the same second epoch.
    assert float(rows[1]["train_loss"]) == pytest.approx(float(uninterrupted[1]["train_loss"]), rel=1e-4)


def test_resume_into_a_new_folder_keeps_the_best_checkpoint(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path, epochs=2, resume=str(tiny_run.out / "last.pt")))

    assert result["epochs_run"] == 0
    assert result["best_epoch"] == tiny_run.result["best_epoch"]
    assert (tmp_path / "best.pt").exists()


def test_init_starts_a_new_run_from_another_runs_weights(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    # A rate of zero leaves the weights as they were loaded (batch-norm statistics still move): the
    # new run's are the old run's best.
    result = train(tiny_config(tmp_path, epochs=1, lr=0.0, init=str(tiny_run.best)))

    started = torch.load(tiny_run.best, weights_only=False)
    ended = torch.load(tmp_path / "last.pt", weights_only=False)
    assert result["epochs_run"] == 1 and ended["epoch"] == 0, "a new run counts its own epochs"
    assert ended["config"]["init"] == str(tiny_run.best)
    weights = [name for name in started["model"] if "running_" not in name and "num_batches" not in name]
    assert weights
    for name in weights:
        assert torch.equal(ended["model"][name], started["model"][name]), name
    train(tiny_config(tmp_path / "fresh", epochs=1, lr=0.0))
    fresh = torch.load(tmp_path / "fresh" / "last.pt", weights_only=False)["model"]
    assert not all(torch.equal(fresh[name], started["model"][name]) for name in weights), \
        "without init the same seed starts elsewhere"


def test_init_refuses_weights_of_another_architecture(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        train(tiny_config(tmp_path, model="attention_unet", init=str(tiny_run.best)))


def _float_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if value.is_floating_point()}


def test_weight_average_is_the_mean_of_the_epochs_it_takes_in(
        tiny_run: TinyRun, tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "avg", average_from=1))
    train(tiny_config(tmp_path / "one", epochs=1))  # the same first epoch, on its own

    averaged = torch.load(tmp_path / "avg" / "average.pt", weights_only=False)
    first = _float_weights(torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"])
    second = _float_weights(torch.load(tmp_path / "avg" / "last.pt", weights_only=False)["model"])
    uninterrupted = _float_weights(torch.load(tiny_run.out / "last.pt", weights_only=False)["model"])
    assert averaged["averaged_epochs"] == 2 and averaged["epoch"] == 1
    assert set(_float_weights(averaged["model"])) == set(second)
    for name, value in second.items():
        assert torch.equal(value, uninterrupted[name]), f"averaging changed the training: {name}"
        torch.testing.assert_close(averaged["model"][name], (first[name] + value) / 2, msg=name)
    assert any(not torch.equal(first[name], second[name]) for name in second)
    with (tmp_path / "avg" / "average.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["averaged_epochs"]) for r in rows] == [("1", "1"), ("2", "2")]


def test_resumed_weight_average_goes_on_from_its_checkpoint(
        tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "whole", epochs=3, average_from=2))
    train(tiny_config(tmp_path / "parts", epochs=2, average_from=2))
    with (tmp_path / "parts" / "average.csv").open("a", newline="") as f:  # written before a crash
        csv.writer(f).writerow(["3", "2", *["0.5"] * 4])
    resume = str(tmp_path / "parts" / "last.pt")
    train(tiny_config(tmp_path / "parts", epochs=3, average_from=2, resume=resume))

    whole = torch.load(tmp_path / "whole" / "average.pt", weights_only=False)
    parts = torch.load(tmp_path / "parts" / "average.pt", weights_only=False)
    assert parts["averaged_epochs"] == whole["averaged_epochs"] == 2
    for name, value in _float_weights(whole["model"]).items():
        torch.testing.assert_close(parts["model"][name], value, msg=name)
    logs = []
    for run in ("whole", "parts"):
        with (tmp_path / run / "average.csv").open(newline="") as f:
            logs.append([(r["epoch"], r["averaged_epochs"], r["val_mean_dice"]) for r in csv.DictReader(f)])
    assert logs[1] == logs[0] and [row[0] for row in logs[0]] == ["2", "3"]


def test_open_log_keeps_only_the_epochs_before_the_resumed_one(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([LOG_FIELDS, *([str(e)] + ["0"] * (len(LOG_FIELDS) - 1) for e in (1, 2, 3))])

    open_log(path, start=2)

    assert [r["epoch"] for r in _log(tmp_path)] == ["1", "2"]


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=2, min_lr_ratio=0.01)

    factors = [lr_factor(e, cfg) for e in range(10)]

    assert factors[0] < factors[1] < factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert lr_factor(cfg.epochs, cfg) == pytest.approx(cfg.min_lr_ratio)


def test_load_data_rejects_a_split_that_leaves_no_validation_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0 val"):
        load_data(TrainConfig(synthetic=True, val_fraction=0.0, out=str(tmp_path)))
