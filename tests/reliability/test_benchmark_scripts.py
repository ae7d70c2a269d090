"""The benchmark scripts run end to end on the tiny model and report what they promise (their numbers
belong to docs/benchmarks.md, not to assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_bench_model_compares_engines_and_reports_flops_and_peak(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    run = _run("bench_model.py", "--model", str(tiny_model_dir / "model.onnx"), "--int8", "", "--sizes", "32",
               "--batches", "1", "2", "--rounds", "1", "--threads", "1", "--no-cuda", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["engines"][:2] == ["torch-eager", "ort-cpu"]
    assert [(c["size"], c["batch"]) for c in result["cases"]] == [(32, 1), (32, 2)]
    for case in result["cases"]:
        assert case["gflop_per_image"] > 0 and case["gemm_gflops"] > 0
        assert set(case["ms_per_image"]) == {"torch-eager", "ort-cpu"}
    assert result["theoretical_peak_gflops"] > 0
    assert "| 32 | 2 |" in run.stdout and "no CUDA" in run.stdout


@pytest.mark.slow
def test_bench_load_measures_both_endpoints_with_batching_on_and_off(tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = _run("bench_load.py", "--model", str(tiny_model_dir / "model.onnx"), "--rounds", "1",
               "--concurrency", "1", "2", "--images", "4", "--batch-files", "2", "--budget-s", "20",
               "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    for endpoint in ("single", "batch"):
        for c in (1, 2):
            for mode in ("on", "off"):
                row = summary[f"{endpoint}|{c}|{mode}"]
                assert row["statuses"] == {"200": row["statuses"]["200"]} and row["images_per_s"] > 0
    assert {"raw|1", "raw|2"} <= set(summary)


def test_bench_tta_times_the_three_modes_side_by_side(tiny_model_dir: Path) -> None:
    run = _run("bench_tta.py", "--model", str(tiny_model_dir / "model.onnx"), "--rounds", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| crop", "| generated"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        none_ms, mirror_ms, dihedral_ms, mirror_ratio, dihedral_ratio = map(float, cells[1:6])
        assert min(none_ms, mirror_ms, dihedral_ms) > 0
        assert mirror_ratio == pytest.approx(mirror_ms / none_ms, rel=0.05, abs=0.01)
        assert dihedral_ratio == pytest.approx(dihedral_ms / none_ms, rel=0.05, abs=0.01)


def _entry(label: str, dice: dict[str, list[float]]) -> dict[str, object]:
    n = len(dice["nucleus"])
    rows = [{"source": "d", "name": f"{i:03d}", "scores": {r: {"dice": dice[r][i]} for r in dice}}
            for i in range(n)]
    return {"label": label, "per_image": rows}


def test_paired_gain_reports_the_mean_difference_its_standard_error_and_the_counts(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import paired_gain
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    base = {"nucleus": [0.90, 0.90, 0.90, 0.90], "cytoplasm": [0.80] * 4, "cell": [0.95] * 4}
    cand = {"nucleus": [0.91, 0.92, 0.89, 0.90], "cytoplasm": [0.80] * 4, "cell": [0.95] * 4}
    report = {"models": [_entry("B", base), _entry("A", cand)]}

    result = paired_gain.paired(report, "A", "B")

    nucleus = result["nucleus"]
    assert nucleus["gain"] == pytest.approx(0.5)                  # (+1 +2 −1 0) / 4 points
    diffs = [1.0, 2.0, -1.0, 0.0]
    sd = (sum((d - 0.5) ** 2 for d in diffs) / 3) ** 0.5
    assert nucleus["se"] == pytest.approx(sd / 2)
    assert (nucleus["better"], nucleus["worse"]) == (2, 1)
    assert result["cytoplasm"]["gain"] == pytest.approx(0) and result["cytoplasm"]["better"] == 0
    assert result["mean"]["gain"] == pytest.approx(0.5 / 3)
    with pytest.raises(KeyError, match="'C' is not in the report"):
        paired_gain.paired(report, "C", "B")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    run = _run("paired_gain.py", str(path), "A", "B")
    assert run.returncode == 0, run.stderr
    assert "A minus B" in run.stdout and "+0.500" in run.stdout


def test_quality_study_conditions_change_the_image_as_named() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.quality_study import CONDITIONS

    image = np.full((96, 128, 3), 220, np.uint8)
    image[30:60, 40:80] = (90, 40, 120)              # a dark purple block with sharp edges

    def steepest(rgb: np.ndarray) -> int:
        return int(np.abs(np.diff(rgb.astype(np.int16), axis=1)).max())

    out = {label: change(image, 50.0, np.random.default_rng(1)) for label, change in CONDITIONS.items()}
    for label, changed in out.items():
        assert changed.shape == image.shape and changed.dtype == np.uint8, label
    assert np.array_equal(out["as is"], image)
    # σ 2 and 4 % of a 50 px cell: 1 and 2 px; the wider blur softens the edge more.
    assert steepest(image) > steepest(out["defocus, blur σ 2 % of the cell"]) > steepest(
        out["defocus, blur σ 4 % of the cell"])
    noise8, noise16 = out["sensor noise σ 8 grey levels"], out["sensor noise σ 16 grey levels"]
    assert noise16.std() > noise8.std() > image.std()
    assert out["tone curve γ 0.7 (lighter)"].mean() > image.mean() > out["tone curve γ 1.4 (darker)"].mean()
    warm, cool = out["warm cast (R ×1.1, B ×0.9)"], out["cool cast (R ×0.9, B ×1.1)"]
    assert warm[..., 0].mean() > image[..., 0].mean() > cool[..., 0].mean()
    assert warm[..., 2].mean() < image[..., 2].mean() < cool[..., 2].mean()
    assert not np.array_equal(out["JPEG quality 20"], image)
    assert steepest(out["coarser sensor (½ resolution, upsampled)"]) < steepest(image)


def test_tally_counts_one_to_one_matches_over_images_for_recall_and_precision() -> None:
    from benchmarks.finder_study import Tally

    tally = Tally()
    # Image 1: two true cells; one found twice (only one may match), the other missed.
    matched, extra, missed = tally.add([(0, 0, 10, 10), (1, 1, 10, 10)], [(0, 0, 10, 10), (50, 50, 60, 60)])
    assert [(i, j) for i, j, _ in matched] == [(0, 0)] and extra == [1] and missed == [1]
    # Image 2: a found box at IoU 1/3 is no match; image 3: nothing found, nothing there.
    tally.add([(0, 0, 10, 10)], [(5, 0, 15, 10)])
    tally.add([], [])
    assert (tally.tp, tally.fp, tally.fn) == (1, 2, 2)
    assert tally.recall == pytest.approx(1 / 3) and tally.precision == pytest.approx(1 / 3)
    assert str(tally) == "0.333 / 0.333"
    assert str(Tally()) == "0.000 / 0.000"
