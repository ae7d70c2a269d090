"""What goes back to the client: JSON documents, the batch CSV and ZIP, safe file names."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import zipfile
from pathlib import PurePosixPath
from typing import Any

from app.measure import REGIONS
from app.pipeline import Failure, Outcome

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def client_filename(name: str | None, default: str = "image") -> str:
    """The base name of an uploaded file as the client named it (browsers may send a full path)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base or default


def safe_stem(filename: str) -> str:
    """A stem fit for a ZIP entry or a header: ASCII letters, digits, `.`, `_`, `-`; never a path."""
    stem = _UNSAFE.sub("_", PurePosixPath(filename).stem).strip("._")
    return stem[:100] or "image"


def unique_stems(filenames: list[str]) -> list[str]:
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


def result_document(outcome: Outcome, model: dict[str, str], include_mask: bool) -> dict[str, Any]:
    """The JSON of one segmented image (`SegmentResult`)."""
    m = outcome.measurements
    document: dict[str, Any] = {
        "filename": outcome.filename, "width": m.width, "height": m.height,
        "areas_px": m.areas_px, "areas_um2": m.areas_um2,
        "fractions": m.fractions, "nc_ratio": m.nc_ratio,
        "model": model, "inference_ms": round(outcome.inference_ms, 2),
    }
    if include_mask and outcome.mask_png is not None:
        document["mask_png_base64"] = base64.b64encode(outcome.mask_png).decode("ascii")
    return document


def failure_document(failure: Failure) -> dict[str, Any]:
    """The JSON of a file that could not be processed (`FileFailure`)."""
    error = failure.error
    return {"filename": failure.filename,
            "error": {"status": error.status, "title": error.title, "detail": error.detail}}


def batch_document(items: list[Outcome | Failure], model: dict[str, str],
                   include_mask: bool) -> dict[str, Any]:
    """The JSON of a batch (`BatchResult`), in upload order."""
    results = [failure_document(i) if isinstance(i, Failure) else result_document(i, model, include_mask)
               for i in items]
    return {"count": len(items), "failed": sum(isinstance(i, Failure) for i in items), "results": results}


def results_csv(items: list[Outcome | Failure], stems: list[str]) -> str:
    """One row per file: name, size, areas, fractions, N:C ratio, mask entry and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "width", "height", *(f"area_{r}_px" for r in REGIONS),
                     *(f"area_{r}_um2" for r in REGIONS), *(f"fraction_{r}" for r in REGIONS),
                     "nc_ratio", "mask", "error"])
    for item, stem in zip(items, stems, strict=True):
        writer.writerow(_csv_row(item, stem))
    return buffer.getvalue()


def _csv_row(item: Outcome | Failure, stem: str) -> list[Any]:
    name = _csv_text(item.filename)
    if isinstance(item, Failure):
        return [name, *[""] * (2 + 3 * len(REGIONS) + 2), f"{item.error.status} {item.error.detail}"]
    m = item.measurements
    um2 = [m.areas_um2[r] for r in REGIONS] if m.areas_um2 else [""] * len(REGIONS)
    return [name, m.width, m.height, *(m.areas_px[r] for r in REGIONS), *um2,
            *(m.fractions[r] for r in REGIONS), "" if m.nc_ratio is None else m.nc_ratio,
            f"{stem}_mask.png", ""]


def _csv_text(text: str) -> str:
    """Keep spreadsheet programs from running a file name as a formula."""
    return "'" + text if text.startswith(_CSV_FORMULA_START) else text


def batch_zip(items: list[Outcome | Failure], document: dict[str, Any], overlay: bool) -> bytes:
    """`<stem>_mask.png` (and `<stem>_overlay.png`) per image, `results.csv` and `results.json`."""
    stems = unique_stems([i.filename for i in items])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for item, stem in zip(items, stems, strict=True):
            if isinstance(item, Outcome) and item.mask_png is not None:
                archive.writestr(f"{stem}_mask.png", item.mask_png, zipfile.ZIP_STORED)
            if overlay and isinstance(item, Outcome) and item.overlay_png is not None:
                archive.writestr(f"{stem}_overlay.png", item.overlay_png, zipfile.ZIP_STORED)
        archive.writestr("results.csv", results_csv(items, stems), zipfile.ZIP_DEFLATED)
        text = json.dumps(document, indent=2, allow_nan=False)
        archive.writestr("results.json", text, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()
