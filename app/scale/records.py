"""What a folder job at scale reads and keeps besides the images: the manifest that lists its files, the
progress record that lets a stopped run resume, and the Parquet tables of its results. No Ray here."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from app.cli import table_rows
from app.cli_backends import FatalError
from app.engine.report import CELL_COLUMNS, RESULT_COLUMNS, TEXT_COLUMNS

PROGRESS_FILE = "progress.jsonl"


def read_manifest(manifest: Path, input_dir: Path) -> list[Path]:
    """The `path` column of a CSV or Parquet manifest, relative to `input_dir`, in order, once each.

    Raises:
        FatalError: unreadable, without a `path` column, empty, or a path outside `input_dir`.
    """
    try:
        if manifest.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            entries = [str(v) for v in pq.read_table(manifest, columns=["path"]).column("path").to_pylist()]
        else:
            with manifest.open(newline="", encoding="utf-8") as f:
                entries = [row["path"] for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as exc:  # pyarrow's errors are ValueErrors too
        raise FatalError(f"cannot read the 'path' column of {manifest}: {exc}") from exc
    root = input_dir.absolute()
    relative: dict[Path, None] = {}
    for entry in entries:
        path = Path(entry)
        rel = path.relative_to(root) if path.is_absolute() and path.is_relative_to(root) else path
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise FatalError(f"{manifest}: {entry!r} is not a file inside {input_dir}")
        relative[rel] = None
    if not relative:
        raise FatalError(f"{manifest} lists no files")
    return list(relative)


class Progress:
    """`progress.jsonl`: the run's settings on the first line, then one finished file's record a line."""

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = path
        self.key = key
        self._file: Any = None

    def start(self, resume: bool, output_dir: Path) -> dict[str, dict[str, Any]]:
        """The records of the files a previous run finished whose outputs are all there, by file (none
        with `resume=False`); the record is written anew with them, dropping the rest.

        Raises:
            FatalError: resuming a run made with another model or other output options.
        """
        lines = self.path.read_text(encoding="utf-8").splitlines() if resume and self.path.is_file() else []
        recorded = (_parsed(lines[0]) or {}).get("run", {}) if lines else self.key
        if recorded != self.key:
            changed = ", ".join(f"{k} {recorded.get(k)!r} then, {v!r} now" for k, v in self.key.items()
                                if recorded.get(k) != v)
            raise FatalError(f"{self.path} records a run with other settings ({changed}); run without "
                             "--resume to start over")
        records = (r for r in map(_parsed, lines[1:]) if r and "file" in r and not r.get("error"))
        done = {r["file"]: r for r in records if _outputs_exist(r, output_dir)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(line) + "\n" for line in ({"run": self.key}, *done.values()))
        self.path.write_text(text, encoding="utf-8")
        return done

    def __enter__(self) -> Progress:
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def add(self, record_json: str) -> None:
        """Append one finished file's record; flushed, so that a stopped run loses nothing it wrote."""
        self._file.write(record_json + "\n")
        self._file.flush()


def _parsed(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # the last line of a run that was killed while writing it
        return None
    return value if isinstance(value, dict) else None


def _outputs_exist(record: dict[str, Any], output_dir: Path) -> bool:
    keys = ("mask", "instances", "overlay", "geojson")
    return all((output_dir / record[k]).is_file() for k in keys if record.get(k))


def write_parquet(output_dir: Path, records: list[dict[str, Any]]) -> None:
    """`results.parquet` and `cells.parquet`: the CSV tables' rows and columns, typed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, cells = table_rows(records)
    for name, table, columns in (("results", rows, RESULT_COLUMNS), ("cells", cells, CELL_COLUMNS)):
        arrays = {c: pa.array([row.get(c) for row in table], type=_arrow_type(c, pa)) for c in columns}
        pq.write_table(pa.table(arrays), output_dir / f"{name}.parquet")


def _arrow_type(column: str, pa: Any) -> Any:
    """The type of a table column, fixed, so that a column empty in one run has it too."""
    if column in TEXT_COLUMNS:
        return pa.string()
    if column in ("touches_border", "primary"):
        return pa.bool_()
    counts = ("width", "height", "cell_count", "primary_cell_id", "cell_id")
    if column in counts or column.endswith("_px") or column.startswith("bbox_"):
        return pa.int64()
    return pa.float64()
