"""`wbc-segment --engine ray` on a local cluster of two simulated nodes: the files it writes are the
in-process run's, and a resumed run redoes only what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.cli import main

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

#: Folders of per-file outputs; the tables are compared on their own.
OUTPUT_FOLDERS = ("masks", "instances", "overlays", "geojson")


def run_ray(image_folder: Path, out: Path, model: Path, address: str, *extra: str) -> int:
    # 0.75 CPU per actor on one-CPU nodes: one model actor on each node, a quarter CPU left on each for
    # the read and write tasks; batches of two files, so that both actors get some.
    return main([str(image_folder), str(out), "--model", str(model), "--overlays", "--geojson",
                 "--engine", "ray", "--address", address, "--actors", "2", "--cpus-per-actor", "0.75",
                 "--batch-size", "2", "--no-progress", *extra])


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for folder in OUTPUT_FOLDERS for p in sorted((out / folder).rglob("*")) if p.is_file()}


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """`results.json` less what differs between two runs of the same model on the same files."""
    records = [{k: v for k, v in r.items() if k != "inference_ms"} for r in document["results"]]
    return {**{k: v for k, v in document.items() if k not in ("seconds", "source")}, "results": records}


@pytest.fixture(scope="module")
def ray_run(image_folder: Path, tiny_model_dir: Path, ray_cluster: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scale-ray")
    assert run_ray(image_folder, out, tiny_model_dir / "model.onnx", ray_cluster.address) == 1
    return out


def test_masks_are_the_in_process_runs_pixel_for_pixel(ray_run: Path, in_process_run: Path) -> None:
    local, remote = outputs(in_process_run), outputs(ray_run)
    assert sorted(remote) == sorted(local)
    assert len([name for name in local if name.startswith("masks/")]) == 8
    for name in (n for n in local if n.endswith("_mask.png") or n.endswith("_instances.png")):
        expected = np.asarray(Image.open(in_process_run / name))
        assert np.array_equal(np.asarray(Image.open(ray_run / name)), expected), name
    assert remote == local  # overlays and GeoJSON too, byte for byte


def test_tables_and_results_json_are_the_in_process_runs(ray_run: Path, in_process_run: Path) -> None:
    for table in ("results.csv", "cells.csv"):
        assert (ray_run / table).read_text() == (in_process_run / table).read_text(), table
    ray_doc = json.loads((ray_run / "results.json").read_text())
    local_doc = json.loads((in_process_run / "results.json").read_text())
    assert ray_doc["source"] == "ray"
    assert comparable(ray_doc) == comparable(local_doc)
    assert ray_doc["failed"] == 1 and ray_doc["results"][0]["file"] == "crops/broken.png"


def test_parquet_tables_hold_the_csv_rows_typed(ray_run: Path) -> None:
    import csv

    import pyarrow.parquet as pq

    results = pq.read_table(ray_run / "results.parquet").to_pylist()
    with (ray_run / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in results] == [r["filename"] for r in rows]
    for parquet_row, csv_row in zip(results, rows, strict=True):
        if not csv_row["error"]:
            assert parquet_row["area_nucleus_px"] == int(csv_row["area_nucleus_px"])
            assert parquet_row["nc_ratio"] == pytest.approx(float(csv_row["nc_ratio"] or "nan"), nan_ok=True)
            assert parquet_row["model_version"] == csv_row["model_version"] != ""
    cells = pq.read_table(ray_run / "cells.parquet")
    assert cells.schema.field("touches_border").type == "bool"
    assert cells.num_rows == len((ray_run / "cells.csv").read_text().splitlines()) - 1 > 0


def test_resume_redoes_only_files_without_outputs_or_record(ray_run: Path, in_process_run: Path,
                                                            image_folder: Path, tiny_model_dir: Path,
                                                            ray_cluster: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(ray_run, out)
    (out / "masks" / "field_1_mask.png").unlink()  # outputs gone: redone
    progress = out / "progress.jsonl"
    lines = progress.read_text().splitlines()
    kept = [line for line in lines if '"file": "crops/cell_2.png"' not in line]  # record gone: redone
    progress.write_text("\n".join(kept) + "\n" + '{"file": "field_3.png", "filen')  # a killed run's last line
    before = {p: p.stat().st_mtime_ns for p in (out / "instances").rglob("*.png")}

    assert run_ray(image_folder, out, tiny_model_dir / "model.onnx", ray_cluster.address, "--resume") == 1

    rewritten = {p.relative_to(out).as_posix() for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert rewritten == {"instances/field_1_instances.png", "instances/crops/cell_2_instances.png"}
    assert outputs(out) == outputs(in_process_run)
    assert (out / "results.csv").read_text() == (in_process_run / "results.csv").read_text()
    records = [json.loads(line) for line in progress.read_text().splitlines()[1:]]
    files = sorted(r["file"] for r in json.loads((out / "results.json").read_text())["results"])
    assert sorted(r["file"] for r in records) == files  # a later resume would skip them all


def test_manifest_lists_the_files_to_segment(ray_run: Path, image_folder: Path, tiny_model_dir: Path,
                                             ray_cluster: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "manifest.parquet"
    paths = ["field_2.png", str(image_folder / "crops" / "cell_0.png"), "field_2.png"]
    pq.write_table(pa.table({"path": paths, "slide": ["a", "b", "a"]}), manifest)
    out = tmp_path / "out"

    code = run_ray(image_folder, out, tiny_model_dir / "model.onnx", ray_cluster.address,
                   "--manifest", str(manifest))

    assert code == 0
    done = json.loads((out / "results.json").read_text())["results"]
    assert [r["file"] for r in done] == ["field_2.png", "crops/cell_0.png"]
    assert outputs(out) == {name: data for name, data in outputs(ray_run).items()
                            if "field_2" in name or "cell_0" in name}
