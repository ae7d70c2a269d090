"""Result documents, the one results CSV writer (with its spreadsheet-formula guard), the batch ZIP and
safe output names: shared by the service's answers and the folder command's files."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath
from typing import IO, Any

from app.engine.cells import Cell
from app.engine.contract import REGIONS
from app.engine.pipeline import Failure, Result

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

#: One row per file, in the service's batch ZIP and the folder command's `results.csv` alike. The last
#: three name what produced the row (`model` of the result): rows of one table can differ, since workers
#: on different hardware serve different precisions and test-time augmentations.
RESULT_COLUMNS: tuple[str, ...] = (
    "filename", "width", "height", "cell_count", "primary_cell_id", "pixel_size_um", "pixel_size_source",
    *(f"area_{r}_px" for r in REGIONS), *(f"area_{r}_um2" for r in REGIONS),
    *(f"fraction_{r}" for r in REGIONS), "nc_ratio", "mask", "instances", "overlay", "error",
    "model_name", "model_version", "tta")
#: One row per cell, in `cells.csv` of the batch ZIP and of the folder command.
CELL_COLUMNS: tuple[str, ...] = (
    "filename", "cell_id", "bbox_x", "bbox_y", "bbox_width", "bbox_height", "centroid_x", "centroid_y",
    *(f"area_{r}_px" for r in REGIONS), *(f"area_{r}_um2" for r in REGIONS), "nc_ratio", "touches_border",
    "score", "primary")
#: The columns of either table that hold text; the others hold numbers or booleans. The typed tables of
#: the Ray job (`app.scale.records`) follow it, so a new text column is typed where it is added.
TEXT_COLUMNS = frozenset({"filename", "pixel_size_source", "mask", "instances", "overlay", "error",
                          "model_name", "model_version", "tta"})


def printable(text: str) -> str:
    """`text` safe for a terminal or a one-line log: control characters (newlines, escape sequences)
    written as escapes (`\\n`, `\\x1b`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def client_filename(name: str | None, default: str = "image") -> str:
    """The base name of an uploaded file as the client named it (browsers may send a full path)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base or default


def safe_stem(filename: str) -> str:
    """A stem fit for a ZIP entry or a header: ASCII letters, digits, `.`, `_`, `-`; never a path."""
    stem = _UNSAFE.sub("_", PurePosixPath(filename).stem).strip("._")
    return stem[:100] or "image"


def unique_stems(filenames: Sequence[str]) -> list[str]:
    """`safe_stem` of each name, with `_2`, `_3`, ... added where two would otherwise be the same."""
    seen: set[str] = set()
    stems = []
    for name in filenames:
        stem, n = safe_stem(name), 1
        candidate = stem
        while candidate.lower() in seen:
            n += 1
            candidate = f"{stem}_{n}"
        seen.add(candidate.lower())
        stems.append(candidate)
    return stems


def cell_document(cell: Cell) -> dict[str, Any]:
    """The JSON of one cell (the API's `CellResult`)."""
    return {"id": cell.id, "bbox": list(cell.bbox), "centroid": list(cell.centroid),
            "areas_px": cell.areas_px, "areas_um2": cell.areas_um2, "nc_ratio": cell.nc_ratio,
            "touches_border": cell.touches_border, "score": cell.score}


def result_document(result: Result, include_mask: bool = False,
                    include_instances: bool = False) -> dict[str, Any]:
    """The JSON of one segmented image (the API's `SegmentResult`)."""
    m = result.measurements
    document: dict[str, Any] = {
        "filename": result.filename, "width": m.width, "height": m.height,
        "areas_px": m.areas_px, "areas_um2": m.areas_um2,
        "fractions": m.fractions, "nc_ratio": m.nc_ratio,
        "model": result.model, "inference_ms": round(result.inference_ms, 2),
        "cell_count": len(result.cells), "primary_cell_id": result.primary_cell_id,
        "pixel_size_um": result.pixel_size_um, "pixel_size_source": result.pixel_size_source,
        "cells": [cell_document(c) for c in result.cells],
    }
    if include_mask and result.mask_png is not None:
        document["mask_png_base64"] = base64.b64encode(result.mask_png).decode("ascii")
    if include_instances and result.instances_png is not None:
        document["instances_png_base64"] = base64.b64encode(result.instances_png).decode("ascii")
    return document


def cell_from_document(document: dict[str, Any]) -> Cell:
    """The `Cell` of a cell's JSON (`cell_document`'s inverse)."""
    return Cell(id=document["id"], bbox=tuple(document["bbox"]),
                centroid=tuple(document["centroid"]), areas_px=document["areas_px"],
                areas_um2=document["areas_um2"], nc_ratio=document["nc_ratio"],
                touches_border=document["touches_border"], score=document["score"])


def failure_document(failure: Failure) -> dict[str, Any]:
    """The JSON of a file that could not be processed (`FileFailure`)."""
    error = failure.error
    return {"filename": failure.filename,
            "error": {"status": error.status, "title": error.title, "detail": error.detail}}


def item_document(item: Result | Failure, include_mask: bool = False,
                  include_instances: bool = False) -> dict[str, Any]:
    """`result_document` or `failure_document`, whichever `item` is."""
    if isinstance(item, Failure):
        return failure_document(item)
    return result_document(item, include_mask, include_instances)


def batch_document(items: Sequence[Result | Failure], include_mask: bool = False,
                   include_instances: bool = False) -> dict[str, Any]:
    """The JSON of a batch (`BatchResult`), in upload order."""
    return {"count": len(items), "failed": sum(isinstance(i, Failure) for i in items),
            "results": [item_document(i, include_mask, include_instances) for i in items]}


def error_text(error: dict[str, Any] | None) -> str:
    """`415 The file is not a PNG, ...`: the status (or title) and detail of a failure."""
    if not error:
        return ""
    prefix = error["status"] if error.get("status") else f"{error['title']}:"
    return f"{prefix} {error['detail']}"


def csv_row(document: dict[str, Any], mask: str = "", overlay: str = "",
            instances: str = "") -> dict[str, Any]:
    """One `RESULT_COLUMNS` row of a result or failure document, with the names of its written files."""
    row: dict[str, Any] = {"filename": document["filename"], "mask": mask, "overlay": overlay,
                           "instances": instances, "error": error_text(document.get("error"))}
    if document.get("error"):
        return row
    keys = ("width", "height", "nc_ratio", "cell_count", "primary_cell_id", "pixel_size_um",
            "pixel_size_source")
    row.update({key: document.get(key) for key in keys})
    model = document.get("model") or {}
    row.update(model_name=model.get("name"), model_version=model.get("version"), tta=model.get("tta"))
    for region in REGIONS:
        row[f"area_{region}_px"] = document["areas_px"][region]
        row[f"area_{region}_um2"] = document["areas_um2"][region] if document["areas_um2"] else None
        row[f"fraction_{region}"] = document["fractions"][region]
    return row


def cell_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The `CELL_COLUMNS` rows of a result document's cells (none for a failure)."""
    rows = []
    for cell in document.get("cells", []):
        x, y, w, h = cell["bbox"]
        row = {"filename": document["filename"], "cell_id": cell["id"], "bbox_x": x, "bbox_y": y,
               "bbox_width": w, "bbox_height": h, "centroid_x": cell["centroid"][0],
               "centroid_y": cell["centroid"][1], "nc_ratio": cell["nc_ratio"],
               "touches_border": cell["touches_border"], "score": cell["score"],
               "primary": cell["id"] == document.get("primary_cell_id")}
        for region in REGIONS:
            row[f"area_{region}_px"] = cell["areas_px"][region]
            row[f"area_{region}_um2"] = cell["areas_um2"][region] if cell["areas_um2"] else None
        rows.append(row)
    return rows


def write_csv(rows: Iterable[dict[str, Any]], stream: IO[str],
              columns: Sequence[str] = RESULT_COLUMNS) -> None:
    """Write rows as CSV; None is an empty cell, and text that a spreadsheet would run as a formula
    (`=`, `+`, `-`, `@`, tab, CR first) is quoted with a leading apostrophe."""
    writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_CSV_FORMULA_START):
        return "'" + value
    return value


def batch_zip(items: Sequence[Result | Failure], overlay: bool) -> bytes:
    """`<stem>_mask.png`, `<stem>_instances.png` (and `<stem>_overlay.png`) per image, `results.csv`,
    `cells.csv` and `results.json`."""
    stems = unique_stems([i.filename for i in items])
    buffer = io.BytesIO()
    rows, cells = [], []
    with zipfile.ZipFile(buffer, "w") as archive:
        for item, stem in zip(items, stems, strict=True):
            names = {}
            if isinstance(item, Result):
                for kind, data in (("mask", item.mask_png), ("instances", item.instances_png),
                                   ("overlay", item.overlay_png if overlay else None)):
                    if data is not None:
                        names[kind] = f"{stem}_{kind}.png"
                        archive.writestr(names[kind], data, zipfile.ZIP_STORED)
            document = item_document(item)
            rows.append(csv_row(document, **names))
            cells += cell_rows(document)
        tables = (("results.csv", rows, RESULT_COLUMNS), ("cells.csv", cells, CELL_COLUMNS))
        for name, table, columns in tables:
            text = io.StringIO()
            write_csv(table, text, columns)
            archive.writestr(name, text.getvalue(), zipfile.ZIP_DEFLATED)
        archive.writestr("results.json", json.dumps(batch_document(items), indent=2, allow_nan=False),
                         zipfile.ZIP_DEFLATED)
    return buffer.getvalue()
