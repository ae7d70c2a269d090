"""`wbc-segment`: a generated folder segmented in-process and through a running service."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.live_server import serving
from support.service import encode, sample_rgb

from app.api.settings import Settings
from app.cli import FolderJob, main, write_outputs, write_tables
from app.cli_backends import LocalBackend, RemoteBackend

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "weights"
API_KEY = "cli-test-key"
#: Good images: relative path → (format, width, height). `sub/c.png` and `sub/c.tif` share a stem.
IMAGES = {
    "a.png": ("PNG", 96, 80),
    "b.jpg": ("JPEG", 64, 72),
    "sub/c.png": ("PNG", 70, 70),
    "sub/c.tif": ("TIFF", 50, 60),
    "sub/deeper/d.bmp": ("BMP", 88, 64),
}
#: Files that must fail, with the status their error starts with.
BAD = {"sub/broken.png": "422", "sub/deeper/fake.jpg": "415"}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for seed, (name, (fmt, width, height)) in enumerate(IMAGES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(sample_rgb(width, height, seed=seed), fmt))
    (root / "sub/broken.png").write_bytes(encode(sample_rgb())[:300])  # truncated
    (root / "sub/deeper/fake.jpg").write_text("a text file with an image's name")
    (root / "notes.txt").write_text("not an image suffix: never picked up")
    return root


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        return {row["filename"]: row for row in csv.DictReader(f)}


def mask_of(out: Path, row: dict[str, str]) -> np.ndarray:
    with Image.open(out / row["mask"]) as image:
        assert image.mode == "P"
        return np.asarray(image)


def test_in_process_run_writes_masks_overlays_and_tables_and_lists_failures(
        image_folder: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main([str(image_folder), str(out), "--model", str(tiny_model_dir / "model.onnx"), "--overlays",
                 "--pixel-size-um", "0.5"])

    assert code == 1  # some files failed
    rows = read_rows(out)
    assert sorted(rows) == sorted([*IMAGES, *BAD])
    nucleus_total = 0
    for name, (_, width, height) in IMAGES.items():
        row = rows[name]
        assert row["error"] == ""
        mask = mask_of(out, row)
        assert mask.shape == (height, width)
        counts = np.bincount(mask.ravel(), minlength=3)
        assert counts.size == 3
        assert (int(row["area_cytoplasm_px"]), int(row["area_nucleus_px"])) == (counts[1], counts[2])
        assert int(row["area_cell_px"]) == counts[1] + counts[2]
        assert float(row["area_cell_um2"]) == pytest.approx(int(row["area_cell_px"]) * 0.25, rel=1e-5)
        with Image.open(out / row["overlay"]) as overlay:
            assert (overlay.mode, overlay.size) == ("RGB", (width, height))
        nucleus_total += counts[2]
        assert (row["model_name"], row["model_version"], row["tta"]) == ("wbc-tiny", "0.0.1", "none")
    assert nucleus_total > 0
    assert rows["sub/c.png"]["mask"] == "masks/sub/c_png_mask.png"
    assert rows["sub/c.tif"]["mask"] == "masks/sub/c_tif_mask.png"
    assert rows["sub/deeper/d.bmp"]["mask"] == "masks/sub/deeper/d_mask.png"
    for name, status in BAD.items():
        assert rows[name]["error"].startswith(status)
        assert rows[name]["mask"] == "" and rows[name]["model_version"] == ""

    document = json.loads((out / "results.json").read_text())
    assert (document["count"], document["failed"]) == (7, 2)
    assert document["model"]["name"] == "wbc-tiny"
    broken = next(r for r in document["results"] if r["file"] == "sub/broken.png")
    assert broken["error"]["status"] == 422

    captured = capsys.readouterr()
    assert "5 segmented, 2 failed" in captured.out
    assert "sub/broken.png" in captured.err and "sub/deeper/fake.jpg" in captured.err


def test_url_mode_sends_batches_within_the_service_limit_and_matches_in_process(
        image_folder: Path, tmp_path: Path, tiny_model_dir: Path,
        settings_for: Callable[..., Settings]) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--pixel-size-um", "0.5", "--batch-size", "8", "--no-progress"]
    assert main([str(image_folder), str(local), "--model", str(tiny_model_dir / "model.onnx"), *common]) == 1
    # The service takes two files per request; the command is asked for eight and must adapt.
    with serving(settings_for(api_key=API_KEY, max_files=2)) as url:
        code = main([str(image_folder), str(remote), "--url", url, "--api-key", API_KEY, "--overlays",
                     *common])

    assert code == 1
    local_rows, remote_rows = read_rows(local), read_rows(remote)
    assert sorted(remote_rows) == sorted(local_rows)
    for name in IMAGES:
        assert remote_rows[name]["error"] == ""
        np.testing.assert_array_equal(mask_of(remote, remote_rows[name]), mask_of(local, local_rows[name]))
        for column in ("width", "height", "area_nucleus_px", "area_cytoplasm_px", "area_cell_um2",
                       "nc_ratio"):
            assert remote_rows[name][column] == local_rows[name][column]
        assert (remote / remote_rows[name]["overlay"]).is_file()
    for name, status in BAD.items():
        assert remote_rows[name]["error"].startswith(status)
    remote_doc, local_doc = (json.loads((d / "results.json").read_text()) for d in (remote, local))
    assert remote_doc["source"] == url
    tiny = {"name": "wbc-tiny", "version": "0.0.1", "tta": "none"}
    assert remote_doc["model"] == local_doc["model"] == tiny
    assert "models" not in remote_doc and "models" not in local_doc


def test_url_mode_stops_when_the_api_key_is_refused(
        image_folder: Path, tmp_path: Path, settings_for: Callable[..., Settings],
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with serving(settings_for(api_key=API_KEY)) as url:
        code = main([str(image_folder), str(out), "--url", url, "--api-key", "wrong", "--no-progress"])

    assert code == 2
    assert "API key" in capsys.readouterr().err
    rows = read_rows(out)
    assert len(rows) == len(IMAGES) + len(BAD)
    assert all(row["error"].startswith("Not processed") for row in rows.values())


def test_glob_selects_files_and_a_clean_run_exits_zero(image_folder: Path, tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    out = image_folder / "results"  # inside the input: its masks must not be read back as images
    args = [str(image_folder), str(out), "--glob", "[a-c].png", "--model", str(tiny_model_dir / "model.onnx")]
    assert main(args) == 0
    assert main(args) == 0
    assert sorted(read_rows(out)) == ["a.png", "sub/c.png"]


@pytest.mark.skipif(not (WEIGHTS / "model.onnx").is_file(), reason="weights/model.onnx is not there yet")
def test_the_shipped_model_is_the_default_and_finds_a_nucleus_in_every_example(tmp_path: Path) -> None:
    folder = tmp_path / "examples"
    folder.mkdir()
    for example in sorted((REPO / "examples").glob("*.png")):
        (folder / example.name).write_bytes(example.read_bytes())

    assert main([str(folder), str(tmp_path / "out"), "--no-progress"]) == 0
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert document["model"]["name"] == json.loads((WEIGHTS / "model.json").read_text())["name"]
    assert len(document["results"]) == 4
    for record in document["results"]:
        assert record["areas_px"]["nucleus"] > 0 and record["nc_ratio"] is not None


def test_a_folder_without_images_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    assert "no files" in capsys.readouterr().err


def _ready(request: httpx.Request) -> httpx.Response | None:
    if request.url.path == "/health/ready":
        return httpx.Response(200, json={"status": "ready", "model": "m", "version": "1", "provider": "CPU"})
    return None


def _batch_answer(mask: np.ndarray) -> dict[str, Any]:
    result = {"filename": "a.png", "width": mask.shape[1], "height": mask.shape[0],
              "areas_px": {"nucleus": 0, "cytoplasm": 0, "cell": 0}, "areas_um2": None,
              "fractions": {"nucleus": 0.0, "cytoplasm": 0.0, "cell": 0.0}, "nc_ratio": None,
              "model": {"name": "m", "version": "1"}, "inference_ms": 1.0,
              "mask_png_base64": base64.b64encode(encode(mask)).decode()}
    return {"count": 1, "failed": 0, "results": [result]}


@pytest.mark.parametrize(("busy_answers", "expected_status"), [(1, None), (5, 503)],
                         ids=["busy-once-then-served", "busy-every-time"])
def test_remote_mode_waits_out_a_busy_service(tmp_path: Path, busy_answers: int,
                                              expected_status: int | None) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(encode(sample_rgb(16, 12)))
    mask = np.zeros((12, 16), np.uint8)
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ready = _ready(request)
        if ready is not None:
            return ready
        posts.append(request)
        if len(posts) <= busy_answers:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"type": "about:blank", "title": "Service overloaded", "status": 503,
                                        "detail": "The inference queue is full."})
        return httpx.Response(200, json=_batch_answer(mask))

    backend = RemoteBackend("http://wbc.test", None, 8, overlays=False, retries=2,
                            transport=httpx.MockTransport(handler))
    [result] = backend.segment([image], None)

    assert len(posts) == min(busy_answers + 1, 3)
    if expected_status is None:
        assert result.mask_png is not None and "error" not in result.record
    else:
        assert result.record["error"]["status"] == expected_status
        assert "queue is full" in result.record["error"]["detail"]


def test_in_process_run_writes_instance_masks_cells_table_and_geojson(tmp_path: Path) -> None:
    from shapely.geometry import shape

    from model_training.synthetic import lobes, make_field

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    field = make_field([(170, 150, 40, lobes(170, 150)), (460, 300, 36, [(460, 300, 22)])])[0]
    (folder / "field.png").write_bytes(encode(field))
    (folder / "empty.png").write_bytes(encode(make_field([], red_cells=20)[0]))
    code = main([str(folder), str(out), "--model", str(REPO / "weights" / "model.onnx"), "--geojson",
                 "--overlays", "--no-progress"])
    assert code == 0
    rows = read_rows(out)
    assert (rows["field.png"]["cell_count"], rows["empty.png"]["cell_count"]) == ("2", "0")
    with Image.open(out / rows["field.png"]["instances"]) as image:
        ids = np.asarray(image)
    with (out / "cells.csv").open(newline="", encoding="utf-8") as f:
        cells = list(csv.DictReader(f))
    assert [c["filename"] for c in cells] == ["field.png", "field.png"]
    for cell in cells:
        assert int((ids == int(cell["cell_id"])).sum()) == int(cell["area_cell_px"])
    features = json.loads((out / "geojson" / "field.geojson").read_text())["features"]
    assert len(features) == 2 and all(shape(f["geometry"]).is_valid for f in features)
    assert json.loads((out / "geojson" / "empty.geojson").read_text())["features"] == []


def test_inputs_whose_output_names_would_collide_each_keep_their_own_files(tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for seed, name in enumerate(("a.png", "a.bmp", "a_png.bmp")):
        (folder / name).write_bytes(encode(sample_rgb(seed=seed), "BMP" if name.endswith("bmp") else "PNG"))
    assert main([str(folder), str(out), "--model", str(tiny_model_dir / "model.onnx"), "--no-progress"]) == 0
    masks = [row["mask"] for row in read_rows(out).values()]
    assert len(masks) == len(set(masks)) == 3
    assert all((out / m).is_file() for m in masks)


def test_a_glob_reaching_outside_the_input_folder_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "outside.png").write_bytes(encode(sample_rgb()))
    code = main([str(tmp_path / "in"), str(tmp_path / "out"), "--glob", "../*.png",
                 "--model", str(tiny_model_dir / "model.onnx")])
    assert code == 2 and "outside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_symbolic_links_out_of_the_input_folder_are_followed_only_when_asked(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    folder, secret = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    secret.mkdir()
    (secret / "private.png").write_bytes(encode(sample_rgb()))
    (folder / "own.png").write_bytes(encode(sample_rgb(seed=1)))
    (folder / "link.png").symlink_to(secret / "private.png")
    model = ["--model", str(tiny_model_dir / "model.onnx"), "--no-progress"]
    assert main([str(folder), str(tmp_path / "out"), *model]) == 0
    assert sorted(read_rows(tmp_path / "out")) == ["own.png"]
    assert main([str(folder), str(tmp_path / "out2"), *model, "--follow-symlinks"]) == 0
    assert sorted(read_rows(tmp_path / "out2")) == ["link.png", "own.png"]


def test_file_names_reach_the_terminal_without_control_characters(tmp_path: Path, tiny_model_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad\x1b[2Jname.png").write_bytes(b"not an image")
    assert main([str(folder), str(tmp_path / "out"), "--model", str(tiny_model_dir / "model.onnx"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "bad\\x1b[2Jname.png" in err


def test_a_run_whose_workers_ran_the_model_differently_names_each_way(
        tmp_path: Path, settings_for: Callable[..., Settings]) -> None:
    # Workers on different hardware may run int8 or fp32, with or without test-time augmentation: each
    # result names its own, and the summary lists them all.
    out = tmp_path / "out"
    records = []
    for i, mode in enumerate(("none", "mirror")):
        backend = LocalBackend(None, None, 8, False, settings=settings_for(tta=mode, warmup_runs=0))
        result = backend.segment_contents([f"{i}.png"], [encode(sample_rgb(seed=i))], None)[0]
        records.append(write_outputs(out, Path(f"{i}.png"), Path(str(i)), result))
    document = json.loads(write_tables(FolderJob(tmp_path, out), backend.model, records, 1.0, None)
                          .json_path.read_text())
    assert [r["model"]["tta"] for r in document["results"]] == ["none", "mirror"]
    assert document["models"] == [r["model"] for r in document["results"]]
    assert document["model"] == document["results"][0]["model"]
