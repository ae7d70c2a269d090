"""`evaluate`: scores checkpoints and exported models on the checkpoint's split; pools runs over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.contract import DEFAULT_NORMALIZATION
from app.engine.errors import ModelLoadError
from model_training.data import split_samples
from model_training.evaluate import (
    EvaluateConfig,
    _warnings,
    data_description,
    evaluate,
    group_name,
    select_split,
)
from model_training.loading import default_label, load_model
from model_training.metrics import METRICS, REGIONS, SURFACE_METRICS
from model_training.report import compare_groups, group_runs, permutation_p
from model_training.synthetic import make_samples
from model_training.train import TrainConfig, load_data

if TYPE_CHECKING:  # fixture types only; conftest is not importable as a module
    from support.training import TinyExport, TinyRun


@pytest.fixture(scope="module")
def report_of_three(tiny_run: TinyRun, tiny_export: TinyExport,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The tiny checkpoint under two seed labels, and its ONNX export, in one report."""
    out = tmp_path_factory.mktemp("eval")
    cfg = EvaluateConfig(models=[f"tiny-s0={tiny_run.best}", f"tiny-s1={tiny_run.out}",
                                 f"shipped={tiny_export.onnx}"], out=str(out), examples=2)
    return evaluate(cfg), out


def test_evaluate_writes_markdown_json_and_figure(report_of_three: tuple[dict[str, Any], Path]) -> None:
    _, out = report_of_three
    markdown = (out / "report.md").read_text()

    assert json.loads((out / "report.json").read_text())["models"][0]["label"] == "tiny-s0"
    for heading in ("## Overall", "### nucleus", "### cytoplasm", "### cell", "## Outlines",
                    "cytoplasm, surface Dice 1 px", "## Per source", "### synthetic0", "## Across seeds",
                    "Average evaluation score", "figure.png"):
        assert heading in markdown
    with Image.open(out / "figure.png") as figure:
        assert figure.format == "PNG" and figure.width > 400 and figure.height > 400


def test_report_has_summaries_per_model_source_and_image(report_of_three: tuple[dict[str, Any], Path],
                                                         tiny_run: TinyRun) -> None:
    report, _ = report_of_three
    model = report["models"][0]
    _, val = load_data(tiny_run.config)

    assert set(report) >= {"split", "average_score", "models", "groups", "comparisons", "warnings"}
    assert report["warnings"] == []   # the checkpoint and its export saw the same images
    assert {f"{r['source']}/{r['name']}" for r in model["per_image"]} == {f"{s.source}/{s.name}" for s in val}
    assert set(model["per_source"]) == {"synthetic0", "synthetic1"}
    assert model["image_counts"] == {"synthetic0": 5, "synthetic1": 5}
    for summary in (model["overall"], *model["per_source"].values()):
        assert {m for r in REGIONS for m in summary[r]} == set(METRICS) | set(SURFACE_METRICS)
        for r in REGIONS:    # an outline within a pixel of the expert's is within two
            assert summary[r]["surface_dice_1px"]["mean"] <= summary[r]["surface_dice_2px"]["mean"] <= 1
        assert set(summary["average"]["score"]) == {"mean", "sd"}
    row = model["per_image"][0]
    assert (row["height"], row["width"]) == (96, 96)   # scored at the image's own size, not the model's 64


def test_onnx_export_scores_as_its_checkpoint(report_of_three: tuple[dict[str, Any], Path]) -> None:
    report, _ = report_of_three
    checkpoint, onnx = report["models"][0], report["models"][2]

    assert onnx["kind"] == "onnx" and checkpoint["kind"] == "checkpoint"
    for a, b in zip(checkpoint["per_image"], onnx["per_image"], strict=True):
        assert a["average"] == pytest.approx(b["average"], abs=1e-3)


def test_seed_labels_are_pooled_into_one_group(report_of_three: tuple[dict[str, Any], Path]) -> None:
    report, _ = report_of_three
    tiny = next(g for g in report["groups"] if g["name"] == "tiny")
    dice = tiny["overall"]["nucleus"]["dice"]

    assert [g["name"] for g in report["groups"]] == ["tiny", "shipped"]
    assert tiny["labels"] == ["tiny-s0", "tiny-s1"] and tiny["runs"] == 2
    assert dice["values"] == [report["models"][0]["overall"]["nucleus"]["dice"]["mean"]] * 2
    assert dice["sd"] == 0.0
    assert {(c["a"], c["b"]) for c in report["comparisons"]} == {("tiny", "shipped")}


@pytest.mark.parametrize(("label", "group"), [("unet-s0", "unet"), ("attention_unet_seed2", "attention_unet"),
                                              ("unet-3", "unet"), ("unet", "unet"), ("resnets3", "resnets3")],
                         ids=["dash-s", "underscore-seed", "dash-number", "no-seed", "no-separator"])
def test_group_by_prefix_strips_only_a_seed_tag(label: str, group: str) -> None:
    assert group_name({"label": label, "architecture": "x"}, "prefix") == group
    assert group_name({"label": label, "architecture": "x"}, "architecture") == "x"
    assert group_name({"label": label, "architecture": "x"}, "none") == label


def _entry(label: str, group: str, dice: float) -> dict[str, Any]:
    """A model entry whose every statistic is `dice`, as `score_model` shapes it."""
    stat = {"mean": dice, "sd": 0.01}
    summary = {r: dict.fromkeys(METRICS, stat) for r in REGIONS} | {"average": {"score": stat}}
    return {"label": label, "group": group, "overall": summary, "per_source": {"a": summary}}


def test_comparison_reports_difference_noise_and_separation_across_seeds() -> None:
    entries = [_entry(f"att-s{i}", "att", v) for i, v in enumerate((0.90, 0.92, 0.94))]
    entries += [_entry(f"unet-s{i}", "unet", v) for i, v in enumerate((0.80, 0.81, 0.85))]

    groups = group_runs(entries)
    average = next(c for c in compare_groups(groups) if c["region"] == "average")

    assert groups[0]["overall"]["cell"]["dice"]["mean"] == pytest.approx(0.92)
    assert groups[0]["overall"]["cell"]["dice"]["sd"] == pytest.approx(0.02)
    assert average["difference"] == pytest.approx(0.92 - 0.82)
    assert average["se"] == pytest.approx(np.sqrt(0.02**2 / 3 + np.std([0.80, 0.81, 0.85], ddof=1) ** 2 / 3))
    assert average["separated"] is True
    assert average["p_permutation"] == pytest.approx(0.1)


def test_overlapping_runs_are_not_separated() -> None:
    entries = [_entry("a-s0", "a", 0.90), _entry("a-s1", "a", 0.80), _entry("b-s0", "b", 0.85),
               _entry("b-s1", "b", 0.86)]

    average = next(c for c in compare_groups(group_runs(entries)) if c["region"] == "average")

    assert average["separated"] is False
    assert average["p_permutation"] > 0.5


@pytest.mark.parametrize(("a", "b", "p"),
                         [([1, 2, 3], [4, 5, 6], 0.1), ([1, 2], [1, 2], 1.0), ([1], [2, 3], None)],
                         ids=["separated-3v3", "identical", "single-run"])
def test_permutation_p_is_exact(a: list[float], b: list[float], p: float | None) -> None:
    assert permutation_p(a, b) == (pytest.approx(p) if p is not None else None)


def test_split_selection_follows_the_checkpoint_names_and_falls_back_to_its_seed() -> None:
    samples = make_samples(10, size=16, seed=0)
    cfg = TrainConfig(synthetic=True, val_fraction=0.2, split_seed=0)
    named = ["synthetic0/0000", "synthetic1/0003"]

    by_name = select_split(samples, "val", cfg, named)
    rest = select_split(samples, "train", cfg, named)
    by_seed = select_split(samples, "val", cfg, ["other/9999"])

    assert [f"{s.source}/{s.name}" for s in by_name] == named
    assert len(rest) == 8 and not {s.name for s in rest} & {"0000", "0003"}
    assert by_seed == split_samples(samples, 0.2, seed=0)[1]
    assert len(select_split(samples, "all", cfg, named)) == 10


def test_evaluate_on_other_data_and_split(tiny_run: TinyRun, tmp_path: Path) -> None:
    report = evaluate(EvaluateConfig(models=[str(tiny_run.best)], synthetic=True, split="train", examples=0,
                                     out=str(tmp_path)))

    assert report["split"] == "train"
    assert report["models"][0]["image_count"] == 38


def test_evaluate_rejects_a_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        evaluate(EvaluateConfig(models=[str(tmp_path / "nothing.pt")], out=str(tmp_path)))


def test_onnx_without_metadata_is_refused(tiny_export: TinyExport, tmp_path: Path) -> None:
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(tiny_export.onnx.read_bytes())

    with pytest.raises(ModelLoadError, match=r"model\.json"):
        evaluate(EvaluateConfig(models=[str(lone)], out=str(tmp_path)))



def test_models_scored_on_different_images_are_flagged() -> None:
    def entry(label: str, names: list[str], seed: int) -> dict[str, Any]:
        return {"label": label, "data": {"synthetic": True, "split_seed": seed},
                "per_image": [{"source": "s", "name": n} for n in names]}

    assert _warnings([entry("a", ["1", "2"], 0), entry("b", ["1", "2"], 0)]) == []
    assert "different images" in _warnings([entry("a", ["1", "2"], 0), entry("b", ["1", "3"], 0)])[0]
    assert "different images" in _warnings([entry("a", ["1", "2"], 0), entry("b", ["1", "2"], 1)])[0]


def test_evaluate_refuses_both_data_and_synthetic(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        evaluate(EvaluateConfig(models=["x.pt"], data=[str(tmp_path)], synthetic=True, out=str(tmp_path)))


@pytest.mark.parametrize(("path", "label"),
                         [("runs/unet-s0/best.pt", "unet-s0"), ("runs/unet-s0/last.pt", "unet-s0-last"),
                          ("weights/model.onnx", "weights"), ("ckpt/epoch12.pt", "epoch12")],
                         ids=["best", "last", "onnx", "other"])
def test_default_label_names_a_run_by_its_folder(path: str, label: str) -> None:
    assert default_label(Path(path)) == label


def test_onnx_is_scored_with_the_preprocessing_its_metadata_records(tiny_export: TinyExport,
                                                                    tmp_path: Path) -> None:
    meta = json.loads((tiny_export.out / "model.json").read_text())
    meta["normalization"]["mean"] = [0.5, 0.5, 0.5]
    (tmp_path / "model.onnx").write_bytes(tiny_export.onnx.read_bytes())
    (tmp_path / "model.json").write_text(json.dumps(meta))

    shipped = load_model(str(tiny_export.onnx), torch.device("cpu"))
    changed = load_model(str(tmp_path / "model.onnx"), torch.device("cpu"))
    image = np.full((20, 30, 3), 128, np.uint8)
    # The engine's transform, built from each file's own metadata: mean 0.5 instead of ImageNet's.
    delta = shipped.transform(image) - changed.transform(image)
    norm = DEFAULT_NORMALIZATION
    assert np.allclose(delta[:, 0, 0], (0.5 - np.array(norm.mean)) / norm.std,
                       atol=1e-5)


def test_one_folder_named_two_ways_is_one_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = data_description(TrainConfig(data=["data"]))
    absolute = data_description(TrainConfig(data=[str(tmp_path / "data")]))
    other = data_description(TrainConfig(data=[str(tmp_path / "other")]))

    assert relative == absolute
    assert relative != other
