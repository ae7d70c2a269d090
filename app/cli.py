"""`wbc-segment INPUT_DIR OUTPUT_DIR`: segment every image in a folder, write masks and measurements.

Runs the shipped ONNX model in this process, or with `--url` sends the images to a running service in
batches, or with `--engine ray` spreads them over a Ray cluster (`app.scale.ray_data`, which also writes
`results.parquet` and `cells.parquet` and can `--resume`). Every way, the output folder gets
`masks/<relative path>_mask.png` (class ids), `instances/<relative path>_instances.png` (16-bit cell
ids), optionally `overlays/<relative path>_overlay.png` and `geojson/<relative path>.geojson` (QuPath
cell objects), `results.csv` (one row per file, failed files included with their error), `cells.csv`
(one row per leukocyte) and `results.json`.
Exit status: 0 when every image was segmented, 1 when some failed, 2 when the run could not start or had
to stop (no images, no model, service unreachable, API key refused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.cli_backends import Backend, FatalError, FileResult, LocalBackend, RemoteBackend
from app.engine.imaging import IMAGE_SUFFIXES
from app.engine.report import CELL_COLUMNS, cell_rows, csv_row, error_text, printable, write_csv


@dataclass(frozen=True)
class RayOptions:
    """How `--engine ray` spreads a `FolderJob` over a Ray cluster (see `app.scale.ray_data`).

    Args:
        address: a running cluster (`ray.init(address=...)`); None starts one on this machine.
        manifest: a CSV or Parquet file whose `path` column lists the files (relative to the input
            folder, or absolute inside it) instead of searching the folder.
        resume: skip the files that the progress record of the output folder lists as done.
        actors: model actors; None: as many as the cluster's GPUs (or CPUs) allow.
        cpus_per_actor, gpus_per_actor: what Ray reserves for each actor; fractions share a device.
    """

    address: str | None = None
    manifest: Path | None = None
    resume: bool = False
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass
class FolderJob:
    """What `segment_folder` does; `url=None` runs the model in this process, `ray` on a Ray cluster."""

    input_dir: Path
    output_dir: Path
    pattern: str | None = None
    overlays: bool = False
    geojson: bool = False
    follow_symlinks: bool = False
    pixel_size_um: float | None = None
    url: str | None = None
    api_key: str | None = None
    batch_size: int = 8
    model_path: Path | None = None
    device: str | None = None
    progress: bool = True
    ray: RayOptions | None = None


@dataclass
class Summary:
    """The outcome of a run."""

    total: int
    failed: int
    seconds: float
    csv_path: Path
    json_path: Path
    fatal: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.total - self.failed


def find_images(input_dir: Path, pattern: str | None = None, exclude: Path | None = None,
                follow_symlinks: bool = False) -> list[Path]:
    """Files under `input_dir`, recursively, sorted: those matching `pattern`, or with an image suffix.

    Args:
        exclude: a folder whose files are skipped (the output folder, when it lies inside the input).
        follow_symlinks: also take files that symbolic links lead to outside `input_dir`.

    Raises:
        FatalError: a pattern that could reach outside `input_dir` (absolute, or with `..`).
    """
    if pattern and (Path(pattern).is_absolute() or ".." in Path(pattern).parts):
        raise FatalError(f"--glob {printable(pattern)} reaches outside the input folder; give a pattern "
                         "relative to it, without '..'")
    candidates = input_dir.rglob(pattern) if pattern else (
        p for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    root = input_dir.resolve()
    skip = exclude.resolve() if exclude else None
    def kept(path: Path) -> bool:
        if not path.is_file():
            return False
        real = path.resolve()
        return not (skip and real.is_relative_to(skip)) and (follow_symlinks or real.is_relative_to(root))

    files = [p for p in candidates if kept(p)]
    return sorted(files, key=lambda p: p.relative_to(input_dir).as_posix())



def output_names(relative: list[Path]) -> dict[Path, Path]:
    """`a/b.png` → `a/b`: where its outputs go; the suffix is kept (`a/b_png`) where two inputs share a
    stem, and a number added where even that would collide (`a.png` and `a_png.bmp`), so that no input's
    outputs overwrite another's."""
    stems: dict[Path, int] = {}
    for p in relative:
        stems[p.with_suffix("")] = stems.get(p.with_suffix(""), 0) + 1
    taken: set[str] = set()
    names = {}
    for p in relative:
        name = p.with_suffix("") if stems[p.with_suffix("")] == 1 else p.with_name(p.name.replace(".", "_"))
        candidate, n = name, 1
        while candidate.as_posix().lower() in taken:
            n += 1
            candidate = name.with_name(f"{name.name}_{n}")
        taken.add(candidate.as_posix().lower())
        names[p] = candidate
    return names


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_outputs(output_dir: Path, relative: Path, stem: Path, result: FileResult) -> dict[str, Any]:
    """Write the result's images and GeoJSON under `output_dir`; return its `results.json` record."""
    record: dict[str, Any] = {"file": relative.as_posix(), **result.record}
    geojson = None if result.geojson is None else (json.dumps(result.geojson) + "\n").encode()
    outputs = (("mask", "masks", "_mask.png", result.mask_png),
               ("instances", "instances", "_instances.png", result.instances_png),
               ("overlay", "overlays", "_overlay.png", result.overlay_png),
               ("geojson", "geojson", ".geojson", geojson))
    for key, folder, suffix, data in outputs:
        if data is not None:
            path = Path(folder) / stem.parent / f"{stem.name}{suffix}"
            _write(output_dir / path, data)
            record[key] = path.as_posix()
    record.setdefault("error", None)
    return record


def _make_backend(job: FolderJob) -> Backend:
    if job.url:
        return RemoteBackend(job.url, job.api_key, job.batch_size, job.overlays, geojson=job.geojson)
    return LocalBackend(job.model_path, job.device, job.batch_size, job.overlays, job.geojson)


def segment_folder(job: FolderJob) -> Summary:
    """Segment every image under `job.input_dir`; write masks, overlays, `results.csv` and `results.json`.

    Raises:
        FatalError: nothing could be done (no images, no model, the service is unreachable).
    """
    if job.ray is not None:
        try:
            from app.scale import ray_data  # Ray is an optional extra, imported only when asked for
        except ModuleNotFoundError as exc:
            raise FatalError(f"--engine ray needs Ray ({exc}): pip install 'wbc-segmenter[scale]'") from exc
        return ray_data.segment_folder(job, job.ray)
    started = time.perf_counter()
    paths = job_images(job)
    backend = _make_backend(job)
    relative = [p.relative_to(job.input_dir) for p in paths]
    stems = output_names(relative)
    records: list[dict[str, Any]] = []
    fatal = None
    with tqdm(total=len(paths), unit="image", desc="Segmenting", disable=not job.progress) as bar:
        for chunk in _chunks(paths, backend.chunk_size):
            try:
                results = backend.segment(chunk, job.pixel_size_um)
            except FatalError as exc:
                fatal = str(exc)
                break
            for path, result in zip(chunk, results, strict=True):
                rel = path.relative_to(job.input_dir)
                records.append(write_outputs(job.output_dir, rel, stems[rel], result))
            bar.update(len(chunk))
    records += [not_processed(rel, fatal) for rel in relative[len(records):]]  # undone by a fatal error
    return write_tables(job, backend.model, records, time.perf_counter() - started, fatal)


def job_images(job: FolderJob) -> list[Path]:
    """The images under `job.input_dir` (`find_images` of its pattern, the output folder left out).

    Raises:
        FatalError: there are none.
    """
    exclude = job.output_dir if job.output_dir.resolve().is_relative_to(job.input_dir.resolve()) else None
    paths = find_images(job.input_dir, job.pattern, exclude, job.follow_symlinks)
    if not paths:
        what = f"matching {job.pattern!r}" if job.pattern else f"with a suffix {', '.join(IMAGE_SUFFIXES)}"
        raise FatalError(f"no files {what} under {job.input_dir}")
    return paths


def not_processed(relative: Path, fatal: str | None) -> dict[str, Any]:
    """The `results.json` record of a file that a fatal error left undone."""
    return {"file": relative.as_posix(), "filename": relative.name,
            "error": {"status": None, "title": "Not processed", "detail": fatal}}


def table_rows(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `RESULT_COLUMNS` rows and the `CELL_COLUMNS` rows of `write_outputs` records."""
    named = [{**r, "filename": r["file"]} for r in records]  # tables name files by their path
    rows = [csv_row(r, r.get("mask") or "", r.get("overlay") or "", r.get("instances") or "") for r in named]
    return rows, [row for r in named for row in cell_rows(r)]


def served_models(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The distinct `model` refs of the results, in order of first use. Workers on different hardware
    may serve different precisions (int8 on a CPU, fp32 on a GPU) and test-time augmentations (`WBC_TTA`
    auto); each result names its own, and a run's summary lists them all."""
    served: list[dict[str, str]] = []
    for record in records:
        if record.get("model") and record["model"] not in served:
            served.append(record["model"])
    return served


def write_tables(job: FolderJob, model: dict[str, str], records: list[dict[str, Any]], seconds: float,
                 fatal: str | None) -> Summary:
    """Write `results.csv`, `cells.csv` and `results.json` of the run's `write_outputs` records."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = job.output_dir / "results.csv", job.output_dir / "results.json"
    rows, cells = table_rows(records)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        write_csv(rows, f)
    with (job.output_dir / "cells.csv").open("w", newline="", encoding="utf-8") as f:
        write_csv(cells, f, CELL_COLUMNS)
    failures = [(r["file"], error_text(r["error"])) for r in records if r.get("error")]
    source = job.url or ("ray" if job.ray else "in-process")
    served = served_models(records) or [model]
    document = {"count": len(records), "failed": len(failures), "pixel_size_um": job.pixel_size_um,
                "model": served[0], "source": source, "seconds": round(seconds, 3), "results": records}
    if len(served) > 1:  # workers on different hardware: each result names its own
        document["models"] = served
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return Summary(len(records), len(failures), seconds, csv_path, json_path, fatal, failures)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


_RAY_ARGS = tuple(f.name for f in fields(RayOptions))


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray (with --engine ray; pip install 'wbc-segmenter[scale]')")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: this process (default); ray: Ray Data over a Ray cluster")
    ray.add_argument("--address", help="a running Ray cluster, e.g. ray://head:10001 or auto (default: "
                                       "start one on this machine)")
    ray.add_argument("--manifest", type=Path, metavar="FILE",
                     help="a .csv or .parquet file whose 'path' column lists the images, relative to "
                          "INPUT_DIR (default: search INPUT_DIR)")
    ray.add_argument("--resume", action="store_true",
                     help="skip the files that OUTPUT_DIR/progress.jsonl lists as done")
    ray.add_argument("--actors", type=_positive_int, metavar="N",
                     help="model actors (default: as many as the cluster's GPUs or CPUs allow)")
    ray.add_argument("--cpus-per-actor", type=_positive_float, default=1.0, metavar="N",
                     help="CPUs Ray reserves per model actor, fractions allowed (default: 1)")
    ray.add_argument("--gpus-per-actor", type=_not_negative_float, default=0.0, metavar="N",
                     help="GPUs per model actor; 0.25 puts four actors on a GPU (default: 0, the CPU)")


def parse_args(argv: Sequence[str] | None = None) -> FolderJob:
    """Command-line arguments → a `FolderJob`."""
    p = argparse.ArgumentParser(
        prog="wbc-segment", description="Segment every image in a folder into nucleus and cytoplasm.",
        epilog="Exit status: 0 all images segmented, 1 some failed (listed in results.csv), 2 stopped.")
    p.add_argument("input_dir", type=Path, help="folder of images, searched recursively")
    p.add_argument("output_dir", type=Path,
                   help="where masks/, instances/, overlays/, geojson/, results.csv, cells.csv and "
                        "results.json go")
    p.add_argument("--glob", dest="pattern", metavar="PATTERN",
                   help="only files matching this, e.g. '*.tif' (default: every PNG, JPEG, BMP and TIFF)")
    p.add_argument("--overlays", action="store_true",
                   help="also write overlays/<name>_overlay.png (classes and numbered cells)")
    p.add_argument("--geojson", action="store_true",
                   help="also write geojson/<name>.geojson: every cell and its nucleus, as QuPath "
                        "imports them")
    p.add_argument("--pixel-size-um", type=_positive_float, metavar="UM",
                   help="microns per pixel: adds areas in µm²")
    p.add_argument("--url", help="a running service, e.g. http://localhost:8000 (default: in-process)")
    p.add_argument("--api-key", metavar="KEY",
                   help="the service's API key, with --url (default: $WBC_API_KEY)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="images per request or model run (default: 8)")
    p.add_argument("--model", dest="model_path", type=Path, metavar="PATH",
                   help="model.onnx, without --url (default: weights/model.onnx)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="without --url (default: auto)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="also segment files that symbolic links lead to outside INPUT_DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    _add_ray_args(p)
    values = vars(p.parse_args(argv))
    if not values["input_dir"].is_dir():
        p.error(f"{values['input_dir']} is not a folder")
    ray: RayOptions | None = RayOptions(**{name: values.pop(name) for name in _RAY_ARGS})
    if values.pop("engine") == "local":
        if ray != RayOptions():
            p.error("--address, --manifest, --resume, --actors and --*-per-actor need --engine ray")
        ray = None
    elif values["url"]:
        p.error("--engine ray runs the model on the cluster; it takes no --url")
    job = FolderJob(**values, ray=ray)
    if job.url and job.api_key is None:
        from app.config import get_settings  # the one reader of the environment

        key = get_settings().api_key
        job.api_key = key.get_secret_value() if key else None
    return job


def print_summary(summary: Summary, limit: int = 20) -> None:
    """The failed files (the first `limit`), their names made safe for a terminal, on stderr, then one
    line of counts and time on stdout."""
    for name, error in summary.failures[:limit]:
        print(f"failed: {printable(name)}: {printable(error)}", file=sys.stderr)
    if len(summary.failures) > limit:
        print(f"... and {len(summary.failures) - limit} more, see {summary.csv_path}", file=sys.stderr)
    if summary.fatal:
        print(f"wbc-segment: stopped: {printable(summary.fatal)}", file=sys.stderr)
    print(f"{summary.ok} segmented, {summary.failed} failed, {summary.total} in all, "
          f"in {summary.seconds:.1f} s; results in {summary.csv_path} and {summary.json_path.name}")


def main(argv: Sequence[str] | None = None) -> int:
    job = parse_args(argv)
    try:
        summary = segment_folder(job)
    except FatalError as exc:
        print(f"wbc-segment: {printable(str(exc))}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 2 if summary.fatal else (1 if summary.failed else 0)


if __name__ == "__main__":
    raise SystemExit(main())
