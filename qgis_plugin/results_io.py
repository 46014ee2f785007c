"""CSV / JSON export of batch answers (shared by the batch dialog and Processing).

Answers are also written as they arrive, so a cancel or a crash keeps the finished ones: the
batch dialog appends each to a JSON Lines autosave file (:func:`append_json_line`), the
Processing batch writes its CSV row by row (:class:`CsvRows`, same file as :func:`write_csv`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

CSV_COLUMNS = ("index", "layer", "raster_path", "question", "answer", "error", "strategy",
               "visual_kept", "visual_candidates", "total_s", "heatmap_path", "anchors_path")


def flat_row(row: dict) -> dict:
    tokens = row.get("tokens") or {}
    timings = row.get("timings") or {}
    out = {k: row.get(k) for k in CSV_COLUMNS}
    out["visual_kept"] = tokens.get("visual_kept")
    out["visual_candidates"] = tokens.get("visual_candidates")
    out["total_s"] = timings.get("total")
    return {k: ("" if v is None else v) for k, v in out.items()}


class CsvRows:
    """A CSV of answers written as they come: the header at once, then each row, flushed, so
    the file holds every finished row at any time. Raises OSError when it cannot be written."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._fh = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, fieldnames=list(CSV_COLUMNS))
        self._writer.writeheader()
        self._fh.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow(flat_row(row))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_csv(rows: list, path: str) -> str:
    with CsvRows(path) as out:
        for row in rows:
            out.write(row)
    return str(path)


def append_json_line(path, row: dict) -> None:
    """Append ``row`` to the JSON Lines file ``path`` (one object a line, the fields of the JSON
    export's rows), on the disk before it returns. Raises OSError when it cannot be written."""
    line = json.dumps(row, default=str) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(rows: list, path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"results": rows}, indent=2, default=str), encoding="utf-8")
    return str(path)
