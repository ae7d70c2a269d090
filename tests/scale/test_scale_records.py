"""`app.scale.records` (manifests, the progress record, the Parquet tables) and the command line that
chooses the engine: the parts of `--engine ray` that need no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import RayOptions, parse_args
from app.cli_backends import FatalError
from app.scale import records

KEY = {"model_sha256": "ab" * 32, "precision": "auto", "overlays": False, "geojson": False,
       "pixel_size_um": None}


def test_csv_manifest_paths_are_relative_to_the_input_folder_in_order_once(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"slide,path\n1,b/x.png\n2,{tmp_path / 'in' / 'a.png'}\n3,b/x.png\n")

    assert records.read_manifest(manifest, tmp_path / "in") == [Path("b/x.png"), Path("a.png")]


@pytest.mark.parametrize("entry", ["../secret.png", "/etc/passwd", '""'], ids=["dotdot", "outside", "empty"])
def test_manifest_path_outside_the_input_folder_is_refused(tmp_path: Path, entry: str) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path\nok.png\n{entry}\n")
    with pytest.raises(FatalError, match="not a file inside"):
        records.read_manifest(manifest, tmp_path / "in")


def test_manifest_without_a_path_column_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("file\na.png\n")
    with pytest.raises(FatalError, match="'path' column"):
        records.read_manifest(manifest, tmp_path)


def record_with_outputs(out: Path, name: str, error: Any = None) -> dict[str, Any]:
    mask = f"masks/{name}_mask.png"
    if error is None:
        (out / mask).parent.mkdir(parents=True, exist_ok=True)
        (out / mask).write_bytes(b"png")
    return {"file": f"{name}.png", "mask": None if error else mask, "error": error}


def test_progress_resumes_only_finished_files_whose_outputs_exist(tmp_path: Path) -> None:
    progress = records.Progress(tmp_path / "progress.jsonl", KEY)
    progress.start(False, tmp_path)
    done = [record_with_outputs(tmp_path, "a"), record_with_outputs(tmp_path, "b"),
            record_with_outputs(tmp_path, "c", {"status": 415})]
    with progress:
        for r in done:
            progress.add(json.dumps(r))
    (tmp_path / "masks/b_mask.png").unlink()
    with progress.path.open("a") as f:
        f.write('{"file": "d.png", "mas')  # the line a killed run was writing

    resumed = records.Progress(progress.path, KEY).start(True, tmp_path)

    assert list(resumed) == ["a.png"]
    lines = progress.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"run": KEY}, done[0]]  # rewritten whole


def test_progress_refuses_to_resume_a_run_with_other_settings(tmp_path: Path) -> None:
    records.Progress(tmp_path / "progress.jsonl", KEY).start(False, tmp_path)
    changed = {**KEY, "overlays": True}
    with pytest.raises(FatalError, match="overlays False then, True now"):
        records.Progress(tmp_path / "progress.jsonl", changed).start(True, tmp_path)
    assert records.Progress(tmp_path / "progress.jsonl", changed).start(False, tmp_path) == {}


def test_parquet_columns_keep_their_types_when_every_value_is_empty(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    failed = {"file": "x.png", "filename": "x.png", "error": {"status": 415, "title": "t", "detail": "d"}}
    records.write_parquet(tmp_path, [failed])

    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema.field("area_cell_um2").type == pa.float64()
    assert table.schema.field("cell_count").type == pa.int64()
    assert table.schema.field("model_version").type == pa.string()
    assert table.to_pylist()[0]["error"] == "415 d"
    assert pq.read_table(tmp_path / "cells.parquet").num_rows == 0


def test_engine_ray_options_reach_the_job(tmp_path: Path) -> None:
    job = parse_args([str(tmp_path), str(tmp_path / "out"), "--engine", "ray", "--address", "auto",
                      "--gpus-per-actor", "0.25", "--actors", "8", "--resume"])
    assert job.ray == RayOptions(address="auto", resume=True, actors=8, gpus_per_actor=0.25)
    assert parse_args([str(tmp_path), str(tmp_path / "out")]).ray is None


@pytest.mark.parametrize("extra", [["--resume"], ["--address", "auto"], ["--engine", "ray", "--url", "http://x"]],
                         ids=["resume-without-ray", "address-without-ray", "ray-with-url"])
def test_ray_options_without_the_ray_engine_are_refused(tmp_path: Path, extra: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(tmp_path), str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert "--engine ray" in capsys.readouterr().err
