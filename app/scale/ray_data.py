"""`wbc-segment --engine ray`: the folder command spread over a Ray cluster with Ray Data.

Three streamed stages; Ray Data keeps only a few blocks of each in flight, so a million files never sit
in memory at once:

1. read and decode (CPU tasks): each file's pixels and recorded pixel size (`engine.decode_upload`, the
   engine's own checks and decoder), or its failure record when it cannot be read or decoded;
2. segment (model actors, `ActorPoolStrategy`): `Engine.segment_many` on a batch of decoded images,
   through the folder command's own `LocalBackend`, built once per actor;
3. write (CPU tasks): masks/, instances/, overlays/ and geojson/ with the folder command's
   `write_outputs`; only each file's small `results.json` record goes back to the driver.

The driver appends every record to `OUTPUT_DIR/progress.jsonl` as it arrives (after its files are
written), so that `--resume` skips what a stopped run finished, and at the end writes `results.csv`,
`cells.csv` and `results.json` (the folder command's `write_tables`) and `results.parquet`,
`cells.parquet`. Every node must see the input, output and model files at the same paths: one machine,
or a filesystem that every node mounts.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset
from tqdm import tqdm

from app.api.settings import Settings
from app.cli import (
    FolderJob,
    RayOptions,
    Summary,
    job_images,
    not_processed,
    output_names,
    write_outputs,
    write_tables,
)
from app.cli_backends import FatalError, FileResult, LocalBackend, local_settings, read_file
from app.engine import Decoded, Failure, Upload, decode_upload
from app.engine.contract import ModelMetadata, metadata_path, verify_model_file
from app.engine.errors import ModelLoadError, ServiceError
from app.engine.imaging import DecodeLimits
from app.engine.report import item_document
from app.scale.records import PROGRESS_FILE, Progress, read_manifest, write_parquet

_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): ")
#: Object store of a cluster the command starts itself: the stream holds a few blocks of bytes and
#: PNGs at a time, and Ray spills to disk beyond it.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2
#: CPUs of each read and write task: they wait on the disk more than they compute.
TASK_CPUS = 0.25
#: Most blocks of the input table: a block (one batch of files) is what Ray Data schedules, hands to an
#: actor and retries; past this many, blocks hold several batches.
MAX_BLOCKS = 10_000


def segment_folder(job: FolderJob, options: RayOptions) -> Summary:
    """`app.cli.segment_folder` on a Ray cluster: the same files written, plus Parquet tables.

    Raises:
        FatalError: nothing could be done (no images, no model, a bad manifest, a mismatched resume).
    """
    started = time.perf_counter()
    relative = _inputs(job, options.manifest)
    stems = output_names(relative)
    settings = _actor_settings(job, options)
    model = _checked_model(settings)
    progress = Progress(job.output_dir / PROGRESS_FILE, _run_key(job, settings, model))
    done = progress.start(options.resume, job.output_dir)
    todo = [i for i, rel in enumerate(relative) if rel.as_posix() not in done]
    rows = [{"index": i, "path": str((job.input_dir / relative[i]).absolute()),
             "file": relative[i].as_posix(), "stem": stems[relative[i]].as_posix()} for i in todo]
    new: dict[int, dict[str, Any]] = {}
    fatal = None
    with _connected(options.address) if rows else nullcontext(), progress, tqdm(
            total=len(relative), initial=len(relative) - len(todo), unit="image", desc="Segmenting",
            disable=not job.progress) as bar:
        try:
            for index, text in _run(rows, job, options, settings):
                new[index] = json.loads(text)
                progress.add(text)
                bar.update()
        except ray.exceptions.RayError as exc:
            fatal = f"the Ray job failed: {_reason(exc)}"
    records = [new.get(i) or done.get(rel.as_posix()) or not_processed(rel, fatal)
               for i, rel in enumerate(relative)]
    summary = write_tables(job, model.ref, records, time.perf_counter() - started, fatal)
    write_parquet(job.output_dir, records)
    return summary


def _run(rows: list[dict[str, Any]], job: FolderJob, options: RayOptions,
         settings: Settings) -> Iterator[tuple[int, str]]:
    """(index, `results.json` record as JSON) of each file, as the cluster finishes them."""
    if not rows:
        return
    DataContext.get_current().enable_progress_bars = False  # the command shows its own
    dataset = build_dataset(rows, job, options, settings, _actor_count(options))
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield from zip((int(i) for i in batch["index"]), batch["record"], strict=True)


def build_dataset(rows: list[dict[str, Any]], job: FolderJob, options: RayOptions, settings: Settings,
                  actors: int) -> Dataset:
    """read (tasks) → segment (`actors` model actors) → write (tasks), one row per file in `rows`."""
    blocks = min(MAX_BLOCKS, -(-len(rows) // job.batch_size))
    actors = min(actors, blocks)  # an actor without a block to work on would only load the model
    return (ray.data.from_items(rows, override_num_blocks=blocks)
            .map_batches(partial(read_batch, limits=settings.decode_limits(),
                                 file_pixel_size=job.pixel_size_um is None),
                         batch_size=job.batch_size, num_cpus=TASK_CPUS)
            .map_batches(Segmenter, batch_size=job.batch_size, compute=ActorPoolStrategy(size=actors),
                         num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None,
                         fn_constructor_kwargs={"settings": settings, "batch_size": job.batch_size,
                                                "overlays": job.overlays, "geojson": job.geojson,
                                                "pixel_size_um": job.pixel_size_um})
            .map_batches(partial(write_batch, output_dir=job.output_dir.absolute()),
                         batch_size=job.batch_size, num_cpus=TASK_CPUS))


def _objects(items: list[Any]) -> np.ndarray:
    """A column of bytes or of text, which Ray Data stores as an Arrow binary or string column. Absent
    values are empty, never None: a column of None alone would come back as NaN floats."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value)


def read_batch(batch: dict[str, np.ndarray], limits: DecodeLimits,
               file_pixel_size: bool) -> dict[str, np.ndarray]:
    """Stage 1: each file's decoded pixels and recorded pixel size (NaN when none), or the failure record
    of a file that cannot be read or decoded."""
    decoded: list[Decoded | FileResult] = []
    for path in batch["path"]:
        content = read_file(Path(path))
        if isinstance(content, FileResult):
            decoded.append(content)
            continue
        try:
            decoded.append(decode_upload(Upload(Path(path).name, content), limits, file_pixel_size))
        except ServiceError as exc:
            decoded.append(FileResult(item_document(Failure(Path(path).name, exc))))
    empty = np.zeros((0, 0, 3), np.uint8)
    return {"index": batch["index"], "file": batch["file"], "stem": batch["stem"],
            "pixels": _objects([d.pixels if isinstance(d, Decoded) else empty for d in decoded]),
            "pixel_size": np.array([d.file_pixel_size_um or np.nan if isinstance(d, Decoded) else np.nan
                                    for d in decoded], np.float64),
            "failure": _objects(["" if isinstance(d, Decoded) else _json(d.record) for d in decoded])}


class Segmenter:
    """Stage 2, a model actor: one `LocalBackend` (one `Engine`, one onnxruntime session) for its life."""

    def __init__(self, settings: Settings, batch_size: int, overlays: bool, geojson: bool,
                 pixel_size_um: float | None) -> None:
        self.backend = LocalBackend(None, None, batch_size, overlays, geojson, settings=settings)
        self.pixel_size_um = pixel_size_um

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [Path(f).name for f in batch["file"]]
        contents: list[Upload | FileResult] = [
            FileResult(json.loads(failure)) if failure else
            Upload(name, b"", decoded=Decoded(np.asarray(pixels), None if np.isnan(size) else float(size)))
            for name, pixels, size, failure in zip(names, batch["pixels"], batch["pixel_size"],
                                                   batch["failure"], strict=True)]
        results = self.backend.segment_contents(names, contents, self.pixel_size_um)
        return {"index": batch["index"], "file": batch["file"], "stem": batch["stem"],
                **{field: _objects([_packed(r, field) for r in results]) for field in RESULT_FIELDS}}


#: A `FileResult`'s fields, each a column between the model actors and the writers: JSON for the
#: dictionaries, bytes for the PNGs, empty where absent.
RESULT_FIELDS = ("record", "mask_png", "overlay_png", "instances_png", "geojson")
_JSON_FIELDS = ("record", "geojson")


def _packed(result: FileResult, field: str) -> str | bytes:
    value = getattr(result, field)
    return _json(value) if field in _JSON_FIELDS else value or b""


def _unpacked(batch: dict[str, np.ndarray], row: int) -> FileResult:
    values: dict[str, Any] = {f: batch[f][row] for f in RESULT_FIELDS}
    fields: dict[str, Any] = {f: (json.loads(v) if f in _JSON_FIELDS else bytes(v)) if len(v) else None
                              for f, v in values.items()}
    return FileResult(**fields)


def write_batch(batch: dict[str, np.ndarray], output_dir: Path) -> dict[str, np.ndarray]:
    """Stage 3: write each result's files; keep only its `results.json` record, as JSON."""
    results = [_unpacked(batch, row) for row in range(len(batch["index"]))]
    records = [write_outputs(output_dir, Path(f), Path(s), r)
               for f, s, r in zip(batch["file"], batch["stem"], results, strict=True)]
    return {"index": batch["index"], "record": _objects([json.dumps(r) for r in records])}


def _run_key(job: FolderJob, settings: Settings, model: ModelMetadata) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {"model_sha256": model.sha256, "precision": settings.precision, "tta": settings.tta,
            "overlays": job.overlays,
            "geojson": job.geojson, "pixel_size_um": job.pixel_size_um}


def _checked_model(settings: Settings) -> ModelMetadata:
    """The configured model's metadata, its file checked against it, on the driver before any actor
    starts: a missing or mismatched model stops the run at once, as it stops the in-process run.

    Raises:
        FatalError: the metadata cannot be read or the file's SHA-256 differs.
    """
    try:
        metadata = ModelMetadata.load(settings.metadata_path or metadata_path(settings.model_path))
        verify_model_file(settings.model_path, metadata)
    except ModelLoadError as exc:
        raise FatalError(f"cannot load the model: {exc}") from exc
    return metadata


def _actor_settings(job: FolderJob, options: RayOptions) -> Settings:
    """The driver's settings for every actor: one onnxruntime thread per reserved CPU (Ray's
    OMP_NUM_THREADS=1 does not reach onnxruntime's own pool), one run at a time."""
    settings = local_settings(job.model_path, job.device, job.batch_size,
                              intra_op_threads=max(1, int(options.cpus_per_actor)), inference_workers=1)
    absolute = settings.model_path.absolute()  # workers need not share the driver's directory
    return settings.model_copy(update={"model_path": absolute})


def _inputs(job: FolderJob, manifest: Path | None) -> list[Path]:
    """The files to segment, relative to the input folder: the manifest's, or the folder's."""
    if manifest is not None:
        return read_manifest(manifest, job.input_dir)
    return [p.relative_to(job.input_dir) for p in job_images(job)]


def _actor_count(options: RayOptions) -> int:
    """`--actors`, else as many as the cluster's GPUs hold, or its CPUs less the tasks' share."""
    if options.actors:
        return options.actors
    resources = ray.cluster_resources()
    if options.gpus_per_actor:
        if resources.get("GPU", 0) < options.gpus_per_actor:
            raise FatalError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs; an actor asks for "
                             f"{options.gpus_per_actor:g} (--gpus-per-actor 0 runs on the CPU)")
        return max(1, int(resources["GPU"] / options.gpus_per_actor))
    free = resources.get("CPU", 1) - 2 * TASK_CPUS  # room for a read and a write task at all times
    return max(1, int(free / options.cpus_per_actor))


@contextmanager
def _connected(address: str | None) -> Iterator[None]:
    """Ray as the caller left it, or joined to `address`, or a small cluster on this machine."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def _reason(exc: BaseException) -> str:
    """The error a Ray worker raised, from the traceback text that Ray hands the driver: its first
    `SomeError: message` line that is not Ray's own, else the text's first line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line) and not line.startswith("ray.")]
    return raised[0] if raised else (lines[0] if lines else type(exc).__name__)

